"""The GPU monitor against a fake NVML module (injected as `pynvml`): readings, throttle warnings, no NVML."""
import logging
import sys
import types

import pytest
import torch

from dinowm.gpu_monitor import GpuMonitor


def fake_nvml(state: dict) -> types.ModuleType:
    """A pynvml stand-in reading `state` (mutable: a test changes the GPU's condition between reads)."""
    m = types.ModuleType("pynvml")
    m.NVML_TEMPERATURE_GPU, m.NVML_CLOCK_SM = 0, 1
    m.nvmlInit = lambda: None

    def handle(uuid):
        if uuid != "GPU-1234":
            raise RuntimeError(f"no GPU {uuid}")
        return "handle"

    m.nvmlDeviceGetHandleByUUID = handle
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=state["util"], memory=10)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=state["mem"], total=80 * 2**30)
    m.nvmlDeviceGetPowerUsage = lambda h: state["mw"]
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    m.nvmlDeviceGetTemperature = lambda h, sensor: {0: state["temp"]}[sensor]
    m.nvmlDeviceGetClockInfo = lambda h, clock: {1: state["sm_mhz"]}[clock]
    m.nvmlDeviceGetCurrentClocksEventReasons = lambda h: state["reasons"]
    return m


@pytest.fixture
def gpu(monkeypatch):
    state = {"util": 97, "mem": 30 * 2**30, "mw": 512_300, "temp": 71, "sm_mhz": 1980, "reasons": 0x1}  # idle bit
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(state))
    return state


def test_readings_in_metric_units(gpu):
    monitor = GpuMonitor("GPU-1234")
    assert monitor.enabled
    values = monitor.read()
    assert values == {"gpu_util_pct": 97.0, "gpu_mem_used_gib": 30.0, "gpu_power_w": pytest.approx(512.3),
                      "gpu_temp_c": 71.0, "gpu_sm_clock_mhz": 1980.0, "gpu_throttle": ""}  # idle: not a slowdown
    assert GpuMonitor.postfix(values) == "97% 30.0G 71C 512W 1980MHz"


def test_a_throttling_gpu_is_named_once_per_new_reason(gpu, caplog):
    monitor = GpuMonitor("GPU-1234")
    gpu.update(temp=87, sm_mhz=1410, reasons=0x20 | 0x40)  # software + hardware thermal slowdown
    with caplog.at_level(logging.WARNING, logger="dinowm"):
        assert monitor.read()["gpu_throttle"] == "sw_thermal,hw_thermal"
        monitor.read()  # the same reasons: no second warning
        gpu.update(mw=699_000, reasons=0x04)  # now the power cap
        assert monitor.read()["gpu_throttle"] == "power_cap"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "GPU throttling (SM clock 1410 MHz, 87 C" in warnings[0] and "thermal (software): 87 C" in warnings[0]
    assert "nvidia-smi -pl" in warnings[0]
    assert "software power cap: drawing 699 W of the 700 W limit" in warnings[1]
    assert GpuMonitor.postfix(monitor.read()).endswith(" power_cap")


@pytest.mark.parametrize("case", ["cpu", "no pynvml", "no such GPU"])
def test_without_nvml_one_info_line_and_no_readings(case, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({}))
    if case == "no pynvml":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with caplog.at_level(logging.INFO, logger="dinowm"):
        monitor = GpuMonitor.for_device(torch.device("cpu")) if case == "cpu" else \
            GpuMonitor("GPU-1234" if case == "no pynvml" else "GPU-9")
        assert not monitor.enabled and monitor.read() == {} and GpuMonitor.postfix({}) == ""
    (line,) = [r for r in caplog.records if r.name == "dinowm"]
    assert line.levelno == logging.INFO and line.getMessage().startswith("GPU monitor: off")


@pytest.mark.gpu
def test_reads_the_training_gpu():
    pytest.importorskip("pynvml")
    monitor = GpuMonitor.for_device(torch.device("cuda", 0))
    values = monitor.read()
    assert monitor.enabled and 0 <= values["gpu_util_pct"] <= 100 and values["gpu_sm_clock_mhz"] > 0


def test_a_reading_the_board_does_not_support_is_left_out(gpu, monkeypatch):
    def not_supported(h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # e.g. utilisation of a MIG slice

    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetUtilizationRates", not_supported)
    values = GpuMonitor("GPU-1234").read()
    assert "gpu_util_pct" not in values and values["gpu_temp_c"] == 71.0
    assert GpuMonitor.postfix(values) == "30.0G 71C 512W 1980MHz"
