"""End-to-end tests of the trainer on a tiny dataset and model (a few seconds each on 2 cores)."""
import json
import os
import signal

import pytest
import torch

import train
from dinowm.checkpoint import load_checkpoint
from franka_fixtures import write_franka_dataset

TINY = [
    "--data.img_size", "32", "--model.encoder_image_size", "28",  # 2x2 patches
    "--model.predictor_depth", "1", "--model.predictor_heads", "2", "--model.predictor_dim_head", "16",
    "--model.predictor_mlp_dim", "64", "--data.frameskip", "2", "--data.num_hist", "2",
    "--data.split_ratio", "0.6", "--training.batch_size", "4", "--eval.max_batches", "1",
    "--eval.rollout_horizon", "2", "--logging.every_steps", "1", "--logging.progress_bar", "false",
]


@pytest.fixture
def dataset(tmp_path):
    return write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))


def run(dataset, out, *extra):
    return train.main(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
                       "--out", str(out), *TINY, *extra])


def train_losses(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_cli_smoke_run_writes_everything(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "--training.epochs", "2")
    for name in ("config.toml", "train.log", "metrics.jsonl", "checkpoints/model_latest.pt",
                 "checkpoints/model_1.pt", "checkpoints/model_2.pt", "train/train_e00001.png",
                 "valid/valid_e00001.png", "rollout/rollout_e00001.png"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 2
    for key in ("val_loss", "val_z_loss", "val_z_visual_loss", "val_z_proprio_loss", "val_decoder_recon_loss",
                "val_decoder_pred_loss", "rollout_z_visual_err", "rollout_h2_psnr", "rollout_h1_ssim"):
        assert key in val[0] and val[0][key] == val[0][key], key  # present and not NaN
    train_records = [r for r in records if r["split"] == "train"]
    assert all("samples_per_s" in r and "data_wait_pct" in r for r in train_records)
    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 2 and ckpt["batch_in_epoch"] == 0
    assert set(ckpt["optimizers"]) == {"predictor", "embeddings", "decoder"}
    assert set(ckpt["norm_stats"]) >= {"action_mean", "action_std", "proprio_mean", "proprio_std"}
    # the random encoder is stored (no weights file to reload it from) and never trained
    assert any(k.startswith("encoder.") for k in ckpt["model"])


def test_encoder_is_frozen_and_everything_else_learns(dataset, tmp_path):
    run(dataset, tmp_path / "a", "--training.max_steps", "1", "--training.feature_cache", "false")
    before = load_checkpoint(tmp_path / "a")["model"]
    train.main(["--resume", str(tmp_path / "a"), "--training.max_steps", "3"])
    after = load_checkpoint(tmp_path / "a")["model"]
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith("encoder."):
            assert not changed, key
        elif key.endswith(("weight", "bias")) and "quantize" not in key:
            assert changed, key


def test_resume_continues_exactly(dataset, tmp_path):
    """Losses after resuming equal those of an uninterrupted run (CPU, fp32, dropout on)."""
    run(dataset, tmp_path / "full", "--training.max_steps", "7")
    run(dataset, tmp_path / "cut", "--training.max_steps", "3")  # stops mid-epoch
    assert load_checkpoint(tmp_path / "cut")["batch_in_epoch"] > 0
    train.main(["--resume", str(tmp_path / "cut"), "--training.max_steps", "7"])
    full, cut = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 8))
    assert all(full[s] == cut[s] for s in full), (full, cut)


def test_ctrl_c_saves_a_checkpoint_before_exiting(dataset, tmp_path, monkeypatch):
    from dinowm.trainer import Trainer

    step = Trainer.train_step

    def interrupted_step(self, batch, decode_prediction):
        out = step(self, batch, decode_prediction)
        if self.step == 1:  # the 2nd step: Ctrl-C arrives in the middle of it
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    with pytest.raises(SystemExit) as exit_info:
        run(dataset, tmp_path / "run")
    assert exit_info.value.code == 130
    assert load_checkpoint(tmp_path / "run")["step"] == 2  # the step in flight was completed, then saved


def test_resume_rejects_a_second_config(dataset, tmp_path):
    with pytest.raises(SystemExit, match="--resume continues a run"):
        train.main(["--resume", str(tmp_path), "--config", "demo.toml"])


def test_missing_data_path_is_one_clear_error(tmp_path):
    with pytest.raises(Exception, match="data.path"):
        train.main(["--config", "franka.toml", "--out", str(tmp_path / "run")])
