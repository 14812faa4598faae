"""Validation and checkpoints every N steps, max_steps past the last epoch, keep-last-K, copy-last logged."""
import json
import os
from types import SimpleNamespace

from dinowm.checkpoint import load_checkpoint
from dinowm.cli import train
from dinowm.trainer import Trainer
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--training.batch_size", "8", "--eval.rollout_horizon", "2", "--eval.rollout_samples", "4"]


def test_every_n_steps_past_the_epochs_keeping_the_last_k(tmp_path):
    data = write_franka_dataset(tmp_path / "d", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    out = tmp_path / "run"
    train(["--config", "demo.toml", "--data.path", str(data), "--data.demo_episodes", "0", "--out", str(out), *TINY,
           "--training.epochs", "1", "--training.max_steps", "7", "--eval.every_steps", "3",
           "--checkpoint.every_steps", "2", "--checkpoint.keep_last", "2", "--logging.every_steps", "1"])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps_per_epoch = sum(1 for r in records if r["split"] == "train" and r["epoch"] <= 1)
    assert steps_per_epoch < 7  # 7 steps is more than one epoch: max_steps is honoured past `epochs`
    assert max(r["step"] for r in records) == load_checkpoint(out)["step"] == 7
    val_steps = sorted({r["step"] for r in records if r["split"] == "val"})
    assert {3, 6, 7} <= set(val_steps)
    val = next(r for r in records if r["split"] == "val")
    assert val["val_copy_last_z_visual_loss"] > 0 and "rollout_h2_ratio_to_copy_last" in val
    assert val["val_z_visual_ratio_to_copy_last"] == val["val_z_visual_loss"] / val["val_copy_last_z_visual_loss"]
    numbered = sorted(p.name for p in (out / "checkpoints").glob("model_*.pt") if p.name != "model_latest.pt")
    # the newest 2 by step: step 6 is the epoch end, saved once as model_1.pt (not again as model_step6.pt)
    assert numbered == ["model_1.pt", "model_step4.pt"]


def test_pruning_keeps_the_newest_by_step_whatever_the_file_times(tmp_path):
    """Epoch copies count as epoch x steps per epoch; file times (reset by cp/rsync) do not matter; files
    the user put there (model_best.pt) and model_latest.pt stay."""
    names = ["model_step8.pt", "model_1.pt", "model_step2.pt", "model_best.pt", "model_latest.pt"]
    for age, name in enumerate(names):  # the newest by step written first: the oldest file time
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    trainer = SimpleNamespace(cfg=SimpleNamespace(checkpoint=SimpleNamespace(keep_last=2)), train_loader=range(6))
    Trainer._prune_checkpoints(trainer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_1.pt", "model_best.pt", "model_latest.pt",
                                                         "model_step8.pt"]
