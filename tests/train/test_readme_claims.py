"""README claims, each backed by a short run: observability outputs (TensorBoard, W&B offline; the profiler is
in test_observability.py), exact resume with DataLoader workers and with the Triton kernel's dropout, and
`training.compile`."""
from __future__ import annotations

import json

import pytest

from dinowm.checkpoint import load_checkpoint
from dinowm.cli import train
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--model.predictor_mlp_dim", "32", "--training.dtype", "fp32", "--eval.max_batches", "1",
        "--eval.rollout_horizon", "1", "--logging.every_steps", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_franka_dataset(tmp_path_factory.mktemp("claims") / "dset", lengths=(14, 12, 16, 12, 14))


def run(dataset, out, *extra):
    return train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
                  "--out", str(out), *TINY, *extra])


def train_losses(run_dir) -> dict:
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def assert_resume_is_exact(dataset, tmp_path, steps: int, cut: int, *extra):
    run(dataset, tmp_path / "full", "--training.max_steps", str(steps), *extra)
    run(dataset, tmp_path / "cut", "--training.max_steps", str(cut), *extra)
    train(["--resume", str(tmp_path / "cut"), "--training.max_steps", str(steps)])
    full, cut_run = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut_run) == list(range(1, steps + 1))
    assert all(full[s] == cut_run[s] for s in full), (full, cut_run)


def test_exact_resume_with_dataloader_workers(dataset, tmp_path):
    assert_resume_is_exact(dataset, tmp_path, 5, 2, "--data.num_workers", "1")


def test_exact_resume_with_triton_dropout(dataset, tmp_path):
    """The Triton attention draws its dropout masks from the model's DropoutSeed, saved with the RNG states."""
    assert_resume_is_exact(dataset, tmp_path, 3, 1, "--model.attention_backend", "triton",
                           "--model.predictor_dropout", "0.1", "--training.feature_cache", "true")


def test_tensorboard_writes_the_logged_scalars(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(dataset, tmp_path / "run", "--training.max_steps", "2", "--logging.tensorboard", "true")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx(list(train_losses(tmp_path / "run").values()), rel=1e-6)


def test_wandb_offline_writes_a_run(dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(dataset, tmp_path / "run", "--training.max_steps", "2", "--logging.wandb", "true")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


@pytest.mark.slow
def test_training_compile_runs_end_to_end(dataset, tmp_path):
    last = run(dataset, tmp_path / "run", "--training.max_steps", "2", "--training.compile", "true")
    assert last["loss"] == last["loss"]  # finite, not NaN
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    assert not any(k.startswith("_orig_mod") or "._orig_mod." in k for k in load_checkpoint(tmp_path / "run")["model"])
