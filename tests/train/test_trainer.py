"""End-to-end tests of the trainer on a tiny dataset and model (a few seconds each on 2 cores)."""
import json
import os
import signal

import pytest
import torch

from dinowm.checkpoint import CheckpointError, load_checkpoint
from dinowm.cli import train
from dinowm.config import ConfigError
from dinowm.data import DatasetError
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--eval.max_batches", "1", "--eval.rollout_horizon", "2", "--logging.every_steps", "1"]


@pytest.fixture
def dataset(tmp_path):
    return write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))


def run(dataset, out, *extra):
    return train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
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
    train(["--resume", str(tmp_path / "a"), "--training.max_steps", "3"])
    after = load_checkpoint(tmp_path / "a")["model"]
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key.startswith("encoder."):
            assert not changed, key
        elif key.endswith(("weight", "bias")) and "quantize" not in key:
            assert changed, key


def interrupt_at(monkeypatch, step_number):
    """Deliver Ctrl-C (SIGINT) in the middle of training step `step_number` (1-based)."""
    from dinowm.trainer import Trainer

    step = Trainer.train_step

    def interrupted_step(self, batch, decode_prediction):
        out = step(self, batch, decode_prediction)
        if self.step + 1 == step_number:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)


def test_resume_continues_exactly(dataset, tmp_path, monkeypatch):
    """Losses after resuming equal those of an uninterrupted run (CPU, fp32, dropout on), through a stop
    mid-epoch (max_steps), a Ctrl-C on the last batch of an epoch, and an epoch boundary."""
    fp32 = ["--training.dtype", "fp32"]
    run(dataset, tmp_path / "full", "--training.max_steps", "16", *fp32)
    steps_per_epoch = 12  # 48 training samples, batch 4
    run(dataset, tmp_path / "cut", "--training.max_steps", "7", *fp32)
    assert load_checkpoint(tmp_path / "cut")["batch_in_epoch"] == 7
    interrupt_at(monkeypatch, steps_per_epoch)
    with pytest.raises(SystemExit):
        train(["--resume", str(tmp_path / "cut"), "--training.max_steps", "16"])
    ckpt = load_checkpoint(tmp_path / "cut")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (12, 1, 0)  # the epoch was finished first
    assert ckpt["flops_per_sample"] > 0  # counted once per run (on an uncompiled first step), kept on resume
    assert (tmp_path / "cut" / "checkpoints" / "model_1.pt").exists()
    monkeypatch.undo()
    train(["--resume", str(tmp_path / "cut"), "--training.max_steps", "16"])
    full, cut = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 17))
    assert all(full[s] == cut[s] for s in full), (full, cut)


def test_logged_losses_are_averaged_over_the_steps_that_have_them(dataset, tmp_path, monkeypatch):
    from dinowm.trainer import Trainer

    def fake_step(self, batch, decode_prediction):
        out = {"loss": torch.tensor(float(self.step))}  # 0, 1, 2, ... before the step counter advances
        if decode_prediction:  # only on logging steps
            out["decoder_pred_loss"] = torch.tensor(7.0)
        return out

    monkeypatch.setattr(Trainer, "train_step", fake_step)
    run(dataset, tmp_path / "run", "--training.max_steps", "6", "--logging.every_steps", "3")
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = {r["step"]: r for r in records if r["split"] == "train"}
    assert logged[3]["loss"] == 1.0 and logged[6]["loss"] == 4.0
    assert logged[3]["decoder_pred_loss"] == logged[6]["decoder_pred_loss"] == 7.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_feature_cache_gives_the_same_training(dataset, tmp_path, dtype):
    """The cache only saves work: losses with and without it agree (up to the summation order of a
    batched encoder call)."""
    args = ["--training.max_steps", "3", "--training.dtype", dtype]
    run(dataset, tmp_path / "cached", *args)
    run(dataset, tmp_path / "uncached", *args, "--training.feature_cache", "false")
    cached, uncached = train_losses(tmp_path / "cached"), train_losses(tmp_path / "uncached")
    for step in cached:
        assert cached[step] == pytest.approx(uncached[step], rel=1e-4), (step, cached, uncached)


def test_init_from_weights_only_checkpoint(dataset, tmp_path):
    from dinowm.config import load_config
    from dinowm.trainer import Trainer

    run(dataset, tmp_path / "a", "--training.max_steps", "2")
    weights = {k: v for k, v in load_checkpoint(tmp_path / "a")["model"].items() if not k.startswith("encoder.")}
    converted = tmp_path / "converted.pt"
    torch.save({"format": "dinowm/1", "model": weights}, converted)  # what the importer writes
    with pytest.raises(CheckpointError, match="--init-from"):
        train(["--resume", str(converted)])
    cfg = load_config("demo.toml", ["--data.path", str(dataset), "--data.demo_episodes", "0", *TINY])
    trainer = Trainer(cfg, tmp_path / "b", init_weights=load_checkpoint(converted)["model"])
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
                "--out", str(tmp_path / "c"), "--init-from", str(converted), "--training.max_steps", "1", *TINY])
    assert load_checkpoint(tmp_path / "c")["step"] == 1
    with pytest.raises(CheckpointError, match=r"the --init-from weights: its weights do not fit .*model\.\*"):
        train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0", "--out",
               str(tmp_path / "d"), "--init-from", str(converted), *TINY, "--model.predictor_mlp_dim", "32"])


def test_resume_refuses_to_change_what_defines_the_run(dataset, tmp_path):
    run(dataset, tmp_path / "a", "--training.max_steps", "1")
    with pytest.raises(ConfigError, match="training.batch_size cannot change"):
        train(["--resume", str(tmp_path / "a"), "--training.batch_size", "2"])
    with pytest.raises(ConfigError, match="model.predictor_depth cannot change"):
        train(["--resume", str(tmp_path / "a"), "--model.predictor_depth", "2"])


def test_written_config_loads_back_with_awkward_strings(dataset, tmp_path):
    from dinowm.config import load_config

    odd = tmp_path / 'dir "quoted" \\ back'
    odd.mkdir()
    data = write_franka_dataset(odd / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    run(data, tmp_path / "run", "--training.max_steps", "1")
    assert load_config(tmp_path / "run" / "config.toml").data.path == str(data)


def test_ctrl_c_saves_a_checkpoint_before_exiting(dataset, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 2)
    with pytest.raises(SystemExit) as exit_info:
        run(dataset, tmp_path / "run")
    assert exit_info.value.code == 130
    assert load_checkpoint(tmp_path / "run")["step"] == 2  # the step in flight was completed, then saved


def test_resume_rejects_a_second_config(dataset, tmp_path):
    with pytest.raises(ConfigError, match="--resume continues a run"):
        train(["--resume", str(tmp_path), "--config", "demo.toml"])


def test_missing_data_path_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="data.path"):
        train(["--config", "franka.toml", "--out", str(tmp_path / "run")])


def test_init_from_keeps_the_encoder_of_the_weights_file(dataset, tmp_path):
    """--init-from a run that stored its random encoder, now with model.encoder_weights: the file's encoder is
    trained with (checkpoints leave it out and reload the file; the file's keys must not be overwritten)."""
    from dinowm.config import load_config
    from dinowm.models.world_model import build_world_model
    from dinowm.trainer import Trainer

    run(dataset, tmp_path / "a", "--training.max_steps", "1")  # a random encoder, stored in its checkpoint
    cfg = load_config("demo.toml", ["--data.path", str(dataset), "--data.demo_episodes", "0", *TINY])
    torch.manual_seed(1)
    encoder_file = tmp_path / "dinov2.pth"
    torch.save(build_world_model(cfg.model, cfg.data).encoder.state_dict(), encoder_file)
    cfg.model.encoder_weights = str(encoder_file)
    trainer = Trainer(cfg, tmp_path / "b", init_weights=load_checkpoint(tmp_path / "a")["model"])
    want = torch.load(encoder_file)
    assert all(torch.equal(v, want[k]) for k, v in trainer.model.encoder.state_dict().items())


def test_resume_from_corrupt_statistics_is_one_line(dataset, tmp_path):
    from dinowm.checkpoint import atomic_save

    run(dataset, tmp_path / "a", "--training.max_steps", "1")
    ckpt = load_checkpoint(tmp_path / "a")
    ckpt["norm_stats"]["action_mean"] = "abc"
    atomic_save(ckpt, tmp_path / "a" / "checkpoints" / "model_latest.pt")
    with pytest.raises(CheckpointError, match=r"--resume checkpoint of .*a: normalisation statistics: action_mean is not"):
        train(["--resume", str(tmp_path / "a"), "--training.max_steps", "2"])
