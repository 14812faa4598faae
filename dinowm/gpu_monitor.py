"""GPU monitor: utilisation, memory, power, temperature, SM clock and throttle reasons via NVML.

Read at every logging step (a few NVML queries, no CUDA sync) into metrics.jsonl and the progress
bar. When the GPU slows its clocks for a reason that costs training speed (thermal, power cap,
hardware slowdown, power brake), a warning names the reason and what to check; it is repeated only
when the set of reasons changes. pynvml (the `gpu` extra) is imported lazily: without it, or on the
CPU, the monitor logs one info line and reads nothing.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("dinowm")

# NVML clock-event ("throttle") reason bits (nvmlClocksEventReason* / nvmlClocksThrottleReason*, stable
# across NVML versions). The others (idle, application clocks, sync boost, display clocks) are not a
# slowdown of a busy training GPU and are not warned about.
THROTTLE_REASONS = {
    0x04: ("power_cap", "software power cap: drawing {power:.0f} W of the {limit:.0f} W limit (raise it with "
                        "`sudo nvidia-smi -pl <watts>` if the cooling allows)"),
    0x08: ("hw_slowdown", "hardware slowdown (temperature or power supply; check cooling and power cables)"),
    0x20: ("sw_thermal", "thermal (software): {temp:.0f} C; improve airflow / fan control, or lower the power "
                         "limit (`sudo nvidia-smi -pl <watts>`) to run cooler at a steady clock"),
    0x40: ("hw_thermal", "thermal (hardware): {temp:.0f} C; improve airflow / fan control, or lower the power "
                         "limit (`sudo nvidia-smi -pl <watts>`)"),
    0x80: ("power_brake", "hardware power brake (the power supply or an external signal asks for less power)"),
}


class GpuMonitor:
    """NVML readings of one GPU. `read()` -> {} when NVML is unavailable."""

    def __init__(self, uuid: str | None, why_off: str = "training on the CPU"):
        """uuid: the GPU's NVML UUID ("GPU-..."; None: the monitor stays off, the log says why_off)."""
        self._nvml = self._handle = None
        self._warned: frozenset = frozenset()
        if uuid is None:
            log.info("GPU monitor: off (%s)", why_off)
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception as e:  # pynvml missing (ImportError) or no usable driver (NVMLError)
            log.info("GPU monitor: off (NVML unavailable: %s; `pip install pynvml` for GPU readings)",
                     type(e).__name__ if not str(e) else e)
            return
        self._nvml = pynvml

    @classmethod
    def for_device(cls, device: torch.device) -> "GpuMonitor":
        if device.type != "cuda":
            return cls(None)
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)  # NVML's UUID without its "GPU-" prefix
        except (AttributeError, RuntimeError) as e:  # the monitor is optional: never stop a run for it
            return cls(None, f"cannot identify {device} for NVML: {e}")
        return cls(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")

    @property
    def enabled(self) -> bool:
        return self._nvml is not None

    def _query(self, name: str, *args):
        """One NVML call; None where the board does not support it (e.g. utilisation of a MIG slice)."""
        try:
            return getattr(self._nvml, name)(self._handle, *args)
        except Exception:  # pynvml.NVMLError_NotSupported and friends: a missing reading, not a failed run
            return None

    def read(self) -> dict:
        """gpu_util_pct, gpu_mem_used_gib (the whole GPU's, all processes), gpu_power_w, gpu_temp_c,
        gpu_sm_clock_mhz, gpu_throttle (names of the slowdown reasons, "" when none), each where the board
        reports it; warns when the reasons for a slowdown change to a non-empty set."""
        if self._nvml is None:
            return {}
        nvml, q = self._nvml, self._query
        raw = {
            "gpu_util_pct": (q("nvmlDeviceGetUtilizationRates"), lambda r: float(r.gpu)),
            "gpu_mem_used_gib": (q("nvmlDeviceGetMemoryInfo"), lambda r: r.used / 2**30),
            "gpu_power_w": (q("nvmlDeviceGetPowerUsage"), lambda mw: mw / 1000.0),
            "gpu_temp_c": (q("nvmlDeviceGetTemperature", nvml.NVML_TEMPERATURE_GPU), float),
            "gpu_sm_clock_mhz": (q("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM), float),
        }
        values = {k: convert(r) for k, (r, convert) in raw.items() if r is not None}
        mask = q("nvmlDeviceGetCurrentClocksEventReasons")
        if mask is None:  # the older name
            mask = q("nvmlDeviceGetCurrentClocksThrottleReasons")
        if mask is None:
            return values
        active = {bit: text for bit, text in THROTTLE_REASONS.items() if int(mask) & bit}
        values["gpu_throttle"] = ",".join(name for name, _ in active.values())
        if active and frozenset(active) != self._warned:
            limit = (q("nvmlDeviceGetEnforcedPowerLimit") or float("nan")) / 1000.0
            nan = float("nan")
            what = "; ".join(text.format(power=values.get("gpu_power_w", nan), limit=limit,
                                         temp=values.get("gpu_temp_c", nan)) for _, text in active.values())
            log.warning("GPU throttling (SM clock %.0f MHz, %.0f C, %.0f W): %s; steps get slower while it lasts",
                        values.get("gpu_sm_clock_mhz", nan), values.get("gpu_temp_c", nan),
                        values.get("gpu_power_w", nan), what)
        self._warned = frozenset(active)
        return values

    @staticmethod
    def postfix(values: dict) -> str:
        """A short progress-bar text: '97% 30.0G 71C 512W 1980MHz' (+ the throttle reasons)."""
        units = (("gpu_util_pct", "{:.0f}%"), ("gpu_mem_used_gib", "{:.1f}G"), ("gpu_temp_c", "{:.0f}C"),
                 ("gpu_power_w", "{:.0f}W"), ("gpu_sm_clock_mhz", "{:.0f}MHz"), ("gpu_throttle", "{}"))
        return " ".join(fmt.format(values[k]) for k, fmt in units if values.get(k) not in (None, ""))
