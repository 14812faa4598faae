"""The demos' time budget: `python train.py --config demo.toml` (and `demo_ac.toml`, the AC predictor) on
a fresh dataset path, start to finish (dataset generation, feature cache, all epochs), against the README's
promise of 10 minutes on 2 CPU cores.

    pytest bench/bench_demo.py --benchmark-only       # the full demo, timed once (minutes)
    pytest bench/bench_demo.py --benchmark-disable    # a 2-step run of the demo config on 2 tiny episodes

Records seconds and the ratio to the budget (`budget_ratio` < 1: within budget) in extra_info.
"""
from __future__ import annotations

import pytest

from dinowm.cli import train

BUDGET_S = 600.0


# config: (its own demo_episodes, given so the fresh --data.path is generated; frames of a quick episode)
DEMOS = {"demo.toml": (8, 40), "demo_ac.toml": (8, 90)}


@pytest.mark.parametrize("config", list(DEMOS))
def test_demo_run(benchmark, request, tmp_path, config):
    quick = request.config.getoption("benchmark_disable")
    episodes, quick_frames = DEMOS[config]
    extra = ["--data.demo_episodes", "2", "--data.demo_frames", str(quick_frames), "--training.max_steps", "2"] \
        if quick else ["--data.demo_episodes", str(episodes)]
    args = ["--config", config, "--data.path", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--logging.progress_bar", "false", *extra]
    last = benchmark.pedantic(lambda: train(args), rounds=1, iterations=1)
    assert last["loss"] == last["loss"]  # finite
    benchmark.extra_info.update(budget_s=BUDGET_S, quick=quick)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.mean
        benchmark.extra_info.update(seconds=seconds, budget_ratio=seconds / BUDGET_S)
