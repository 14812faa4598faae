"""Shared benchmark fixtures.

    pytest bench/ --benchmark-only --benchmark-group-by=group,param     # time the real shapes
    pytest bench/ --benchmark-disable -q                                # run each benchmark once, small shapes

BENCH_THREADS=n sets torch's intra-op threads (on a CPU shared with other jobs, 1 thread gives
stable figures: OpenMP barriers stall whenever one of the threads is descheduled).
"""
from __future__ import annotations

import os
import time
import types

import pytest
import torch

if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def best_time(fn, device: torch.device, rounds: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of fn() in seconds over `rounds` runs (after `warmup`), synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.fixture(scope="session")
def timing_cache() -> dict:
    """Session-wide {key: seconds}: baselines are timed once and shared by every benchmark's ratios."""
    return {}


def is_disabled(benchmark) -> bool:
    """True under --benchmark-disable: run once on small shapes, time nothing."""
    return bool(getattr(benchmark, "disabled", False))


def skip_untimed_triton(provider: str, device: torch.device, small: bool) -> None:
    """Triton is timed on CUDA only; on CPU it runs as a quick test under TRITON_INTERPRET=1."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if provider == "triton" and device.type != "cuda" and not (small and interpreting):
        pytest.skip("triton is timed on CUDA only (on CPU it runs as a quick test under TRITON_INTERPRET=1)")


@pytest.fixture(scope="session")
def bench_utils():
    """The helpers above, for bench files (a conftest cannot be imported reliably: tests/ has one too)."""
    return types.SimpleNamespace(synchronize=synchronize, device_name=device_name, best_time=best_time,
                                 is_disabled=is_disabled, skip_untimed_triton=skip_untimed_triton)
