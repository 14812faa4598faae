"""Observability components: throughput metrics, metric sinks, profiler, image metrics.

- `StepTimer` owns the timers of the training loop: samples/s, data-wait %, achieved FLOP/s and
  MFU (when the device's peak is known; FLOPs counted on the first real step), peak memory per
  epoch; one device sync per logging window, none per step; validation etc. left out.
- `MetricSink` writes every record to `<run>/metrics.jsonl`, and to TensorBoard / W&B only when
  they are installed and enabled.
- `maybe_profile` yields a torch.profiler (or None); the loop calls `.step()` on it; it writes a
  Chrome trace and a key-averages table.
- `psnr` / `ssim` compare decoded frames with ground truth (images in [-1, 1]).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("dinowm")

# Dense bf16 tensor-core peaks (FLOP/s) of the cards our users train on, for MFU; the first key the
# device name contains wins (so the H100 PCIe / NVL variants come before the SXM "H100").
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (the first key of PEAK_BF16_FLOPS it contains), None if unknown."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def count_step_flops(step_fn) -> tuple[object, int]:
    """Run `step_fn()` once under FlopCounterMode; returns (its result, FLOPs of forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = step_fn()
    return result, counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Throughput of the training steps between two logging steps, without a device sync per step.

    The host queues a step's work and runs ahead of the device; the window is timed from one logging
    step to the next, each `summary()` ending with one synchronize, so it covers the device's work of
    its steps. What the loop does inside `excluded()` (validation, rollouts, images, checkpoints:
    synchronised on entry and exit) counts neither as step time nor as data wait. Data wait: host time
    from the end of one step's launch to the arrival of the next batch.

    `clock`: seconds (time.perf_counter by default; tests pass a fake one).
    """

    def __init__(self, device: torch.device, flops_per_sample: float | None = None, devices: int = 1,
                 clock=None):
        """devices: how many devices (ranks) step together; throughput and MFU are then of all of them."""
        self.device = device
        self.flops_per_sample = flops_per_sample
        peak = device_peak_flops(device)
        self.peak_flops = peak * devices if peak else None
        self._clock = clock or time.perf_counter
        self._start_window()

    def _start_window(self):
        self.samples = self.steps = 0
        self.data_seconds = self.excluded_seconds = 0.0
        self._window_start = self._mark = self._clock()

    def run_step(self, step_fn, batch_size: int):
        """`step_fn()`; the first time under FlopCounterMode, which sets flops_per_sample (counted on a
        real training step, so no extra work is done)."""
        if self.flops_per_sample is not None:
            return step_fn()
        out, flops = count_step_flops(step_fn)
        self.flops_per_sample = flops / batch_size
        return out

    def data_ready(self) -> None:
        """Call when the batch has arrived: the time since the last step ended was data wait."""
        self.data_seconds += self._clock() - self._mark

    def step_done(self, batch_size: int) -> None:
        """Call when a step's work has been launched (no sync: the device may still be running it)."""
        self.samples += batch_size
        self.steps += 1
        self._mark = self._clock()

    @contextlib.contextmanager
    def excluded(self):
        """Time spent inside is left out of the window (validation, rollouts, images, checkpoints)."""
        _sync(self.device)  # the steps' queued work belongs to the steps
        start = self._clock()
        try:
            yield
        finally:
            _sync(self.device)
            spent = self._clock() - start
            self.excluded_seconds += spent
            self._mark += spent  # the next batch's data wait starts after it

    def start_epoch(self) -> None:
        """Peak memory is reported per epoch: reset the device's peak counter."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self) -> dict:
        """Throughput of the window since the last summary (one device sync; then starts a new window).

        samples_per_s, step_time_s (mean wall time per step, data wait included), data_wait_pct,
        excluded_s (validation etc. left out), tflops (achieved, of all devices), mfu_pct (of the
        devices' dense bf16 peak, known GPUs only), peak_mem_gib (CUDA: allocated, since the epoch began).
        """
        _sync(self.device)
        seconds = max(self._clock() - self._window_start - self.excluded_seconds, 1e-9)
        out = {
            "samples_per_s": self.samples / seconds,
            "step_time_s": seconds / max(self.steps, 1),
            "data_wait_pct": 100.0 * self.data_seconds / seconds,
            "excluded_s": self.excluded_seconds,
        }
        if self.flops_per_sample:
            achieved = self.flops_per_sample * self.samples / seconds
            out["tflops"] = achieved / 1e12
            if self.peak_flops:
                out["mfu_pct"] = 100.0 * achieved / self.peak_flops
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._start_window()
        return out


class MetricSink:
    """metrics.jsonl always; TensorBoard / W&B when enabled and installed (a warning otherwise).

    resume_step: the step of the checkpoint a run resumes from; records of later steps (written after
    that checkpoint, before the run stopped) are dropped, so no step is logged twice. enabled=False (ranks
    other than 0) writes nothing.
    """

    def __init__(self, run_dir: Path, config: dict, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "dino_wm", enabled: bool = True, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            drop_records_after(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1  # drops events of later steps
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                log.warning("logging.tensorboard = true but tensorboard is not installed; writing metrics.jsonl only")
        if wandb:
            try:
                import wandb as wandb_module

                self._wandb = wandb_module.init(project=wandb_project, dir=str(run_dir), config=config)
            except ImportError:
                log.warning("logging.wandb = true but wandb is not installed; writing metrics.jsonl only")

    def write(self, step: int, split: str, values: dict) -> None:
        if self._file is None:
            return
        record = {"step": step, "split": split, "time": time.time()}
        record.update({k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        scalars = {f"{split}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float, torch.Tensor))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite a metrics.jsonl keeping the records of steps <= step (and dropping a line cut by a crash)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


@contextlib.contextmanager
def maybe_profile(cfg, run_dir: Path):
    """Yield a torch.profiler.profile when cfg.enabled, else None. It records `cfg.active` steps after
    `cfg.wait` + `cfg.warmup` and writes into <run>/profile/: the Chrome trace (*.pt.trace.json) and
    key_averages.txt, the top ops by self time on the CPU and, where recorded, on the GPU."""
    if not cfg.enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    write_trace = tensorboard_trace_handler(str(out))

    def on_trace_ready(prof):
        write_trace(prof)
        write_key_averages(prof, out / "key_averages.txt", cuda)

    with profile(
        activities=activities,
        schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=1),
        on_trace_ready=on_trace_ready,
        record_shapes=True,
        profile_memory=True,
    ) as prof:
        yield prof
    log.info("profiler: Chrome trace and key_averages.txt in %s (open the trace in https://ui.perfetto.dev or "
             "chrome://tracing)", out)


def write_key_averages(prof, path: Path, cuda: bool, rows: int = 40) -> None:
    """The profiled steps' ops, aggregated by name: the top `rows` by self CPU time, then by self GPU time."""
    averages = prof.key_averages()
    sections = [("self CPU time", "self_cpu_time_total")]
    if cuda:
        sections.append(("self GPU time", "self_device_time_total"))
    text = [f"# top {rows} ops by {title} over the profiled steps\n{averages.table(sort_by=key, row_limit=rows)}"
            for title, key in sections]
    path.write_text("\n\n".join(text) + "\n")


# ----------------------------------------------------------------------------------------------
# image metrics (images in [-1, 1], shape (N, 3, H, W))
# ----------------------------------------------------------------------------------------------
def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, on the [0, 1] scale: (N,)."""
    p = (pred.float().clamp(-1, 1) + 1) / 2
    t = (target.float() + 1) / 2
    mse = (p - t).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) on [0, 1]: (N,).
    Always fp32, also inside a bf16 autocast region: the variances are differences of blurred squares of
    the size of c2, which bf16 convolutions would round away."""
    with torch.autocast(pred.device.type, enabled=False):
        return _ssim(pred, target, window, sigma)


def _ssim(pred: torch.Tensor, target: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    p = (pred.float().clamp(-1, 1) + 1) / 2
    t = (target.float() + 1) / 2
    channels = p.shape[1]
    coords = torch.arange(window, dtype=torch.float32, device=p.device) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(x):
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p**2
    var_t = blur(t * t) - mu_t**2
    cov = blur(p * t) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return ssim_map.flatten(1).mean(1)
