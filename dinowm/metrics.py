"""Observability components: throughput metrics, metric sinks, profiler, image metrics.

- `StepTimer` owns the timers of the training loop: samples/s, data-wait %, achieved FLOP/s and
  MFU (when the device's peak is known; FLOPs counted on the first real step), peak memory.
- `LossWindow` averages the step losses between two logging steps.
- `MetricSink` writes every record to `<run>/metrics.jsonl`, and to TensorBoard / W&B only when
  they are installed and enabled.
- `maybe_profile` yields a torch.profiler (or None); the loop calls `.step()` on it.
- `psnr` / `ssim` compare decoded frames with ground truth (images in [-1, 1]).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("dinowm")

# Dense bf16 tensor-core peaks (FLOP/s) of the cards our users train on, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
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
    """Times data wait vs compute per step and summarises a logging window."""

    def __init__(self, device: torch.device, flops_per_sample: float | None = None, devices: int = 1):
        """devices: how many devices (ranks) step together; throughput and MFU are then of all of them."""
        self.device = device
        self.flops_per_sample = flops_per_sample
        peak = device_peak_flops(device)
        self.peak_flops = peak * devices if peak else None
        self._reset_window()
        self._mark = time.perf_counter()

    def _reset_window(self):
        self.samples = 0
        self.data_seconds = 0.0
        self.total_seconds = 0.0

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
        self.data_seconds += time.perf_counter() - self._mark

    def step_done(self, batch_size: int) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.total_seconds += now - self._mark
        self.samples += batch_size
        self._mark = now

    def summary(self) -> dict:
        """Throughput of the window since the last summary (then starts a new window)."""
        seconds = max(self.total_seconds, 1e-9)
        out = {
            "samples_per_s": self.samples / seconds,
            "step_time_s": seconds,
            "data_wait_pct": 100.0 * self.data_seconds / seconds,
        }
        if self.flops_per_sample:
            achieved = self.flops_per_sample * self.samples / seconds
            out["tflops"] = achieved / 1e12
            if self.peak_flops:
                out["mfu_pct"] = 100.0 * achieved / self.peak_flops
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._reset_window()
        return out


class LossWindow:
    """Mean of every `*loss` entry of the step outputs since the last `mean()`, each key over its own
    count (decoder_pred_loss exists only on logging steps)."""

    def __init__(self):
        self._sums, self._counts = defaultdict(float), defaultdict(int)

    def add(self, out: dict) -> None:
        for k, v in out.items():
            if k.endswith("loss"):
                self._sums[k] += float(v.detach())
                self._counts[k] += 1

    def mean(self) -> dict:
        """{key: mean} over the window, then starts a new window."""
        means = {k: v / self._counts[k] for k, v in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return means


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
    """Yield a torch.profiler.profile (chrome traces in <run>/profile/) when cfg.enabled, else None."""
    if not cfg.enabled:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    out = run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)
    with profile(
        activities=activities,
        schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(out)),
        record_shapes=True,
        profile_memory=True,
    ) as prof:
        yield prof
    log.info("profiler trace written to %s (open in chrome://tracing or Perfetto)", out)


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
    """Structural similarity per image (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) on [0, 1]: (N,)."""
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
