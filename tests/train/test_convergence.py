"""Convergence in the Liger-Kernel manner: the same tiny training run with every Triton kernel (under the
interpreter on CPU) and with the reference backends gives the same per-step losses."""
from __future__ import annotations

import json

import pytest

from dinowm.cli import train
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

STEPS = 4
TINY = [*TINY_RUN, "--model.predictor_mlp_dim", "32",
        "--model.predictor_dropout", "0.0",  # the Triton kernel's dropout mask is its own (Philox), not torch's
        "--training.dtype", "fp32", "--training.max_steps", str(STEPS), "--eval.max_batches", "1",
        "--eval.rollout_horizon", "1", "--logging.every_steps", "1"]


def step_losses(run_dir) -> dict:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in records if r["split"] == "train"}


@pytest.mark.slow
def test_triton_backends_train_like_the_reference(tmp_path):
    data = write_franka_dataset(tmp_path / "dset", lengths=(14, 12, 16, 12, 14), hw=(32, 32))
    runs = {}
    for backend in ("reference", "triton"):
        backends = ["--model.attention_backend", backend, "--model.layernorm_linear_backend", backend,
                    "--model.embedding_backend", backend]
        train(["--config", "demo.toml", "--data.path", str(data), "--data.demo_episodes", "0",
               "--out", str(tmp_path / backend), *TINY, *backends])
        runs[backend] = step_losses(tmp_path / backend)
    ref, tri = runs["reference"], runs["triton"]
    assert sorted(ref) == sorted(tri) == list(range(1, STEPS + 1))
    assert ref[1]["loss"] != ref[STEPS]["loss"]  # the run trains: losses move
    for step in ref:
        for key, value in ref[step].items():
            assert tri[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key, ref[step], tri[step])
