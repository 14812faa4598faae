"""End-to-end tests of the trainer with the AC predictor (model.predictor = "ac") on a tiny dataset."""
import json
import logging

import pytest
import torch

from dinowm.checkpoint import load_checkpoint
from dinowm.cli import train
from dinowm.config import ConfigError
from dinowm.data import DatasetError
from dinowm.eval import main as evaluate_main
from franka_fixtures import write_franka_dataset
from test_trainer import TINY, interrupt_at, train_losses

AC_TINY = [
    "--data.img_size", "32", "--model.encoder_image_size", "28",  # 2x2 patches
    "--model.ac_dim", "48", "--model.ac_depth", "2", "--model.ac_heads", "2",
    "--data.frameskip", "2", "--data.split_ratio", "0.6", "--training.batch_size", "4",
    "--training.dtype", "fp32", "--eval.max_batches", "1", "--eval.rollout_horizon", "2",
    "--logging.every_steps", "1", "--logging.progress_bar", "false",
]


@pytest.fixture
def dataset(tmp_path):
    return write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))


def run(dataset, out, *extra):
    return train(["--config", "demo_ac.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
                       "--data.num_hist", "3", "--out", str(out), *AC_TINY, *extra])


def records(run_dir, split):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["split"] == split]


def test_ac_run_writes_losses_baseline_rollout_metrics_and_schedule(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "--training.epochs", "2", "--optim.schedule", "cosine")
    val = records(out, "val")
    assert len(val) == 2
    for key in ("val_loss", "val_z_tf_loss", "val_z_rollout_loss", "val_copy_last_loss", "val_decoder_recon_loss",
                "rollout_h1_z_visual_l1", "rollout_h2_z_visual_err", "rollout_h2_psnr", "rollout_h1_ssim"):
        assert key in val[0] and val[0][key] == val[0][key], key
    assert "rollout_h1_z_proprio_err" not in val[0]  # the AC latent has no proprio part
    assert "val_copy_last_z_visual_loss" not in val[0]  # DINO-WM's baseline; AC's is val_copy_last_loss
    ckpt = load_checkpoint(out)
    assert set(ckpt["optimizers"]) == {"predictor", "decoder"}
    assert ckpt["schedule"]["kind"] == "cosine" and ckpt["schedule"]["total_steps"] == ckpt["step"]
    assert {"predictor.predictor_embed.weight", "predictor.predictor_blocks.1.attn.qkv.bias",
            "predictor.state_encoder.weight"} <= set(ckpt["model"])
    assert (out / "rollout" / "rollout_e00001.png").exists()
    # the predictor's optimiser: weight decay on matrices only
    decay, no_decay = ckpt["optimizers"]["predictor"]["param_groups"]
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0


def test_learning_rate_follows_the_schedule(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "--training.max_steps", "6", "--optim.schedule", "cosine", "--optim.warmup_steps", "2",
        "--optim.predictor_lr", "1e-3")
    lr = load_checkpoint(out)["optimizers"]["predictor"]["param_groups"][0]["lr"]
    # step index 5 of 6 (the last): cosine from 1e-3 at step 2 to 0 at step 6: u = 3/4
    assert lr == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(0.75 * torch.pi)).item()), rel=1e-6)


def test_ac_resume_continues_exactly_with_rollout_loss_and_schedule(dataset, tmp_path, monkeypatch, caplog):
    args = ["--training.epochs", "2", "--optim.schedule", "wsd", "--optim.warmup_steps", "3"]
    run(dataset, tmp_path / "full", *args)
    interrupt_at(monkeypatch, 5)
    with pytest.raises(SystemExit):
        run(dataset, tmp_path / "cut", *args)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut")["step"] == 5
    with caplog.at_level(logging.INFO, logger="dinowm"):
        train(["--resume", str(tmp_path / "cut")])
    full, cut = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) and len(full) > 5
    assert all(full[s] == cut[s] for s in full), (full, cut)
    assert "resumed at step 5" in caplog.text and "configured now" not in caplog.text  # the scheduled lr is no change


def test_resume_with_another_learning_rate_says_so(dataset, tmp_path, caplog):
    run(dataset, tmp_path / "a", "--training.max_steps", "1", "--optim.predictor_lr", "2e-3")
    with caplog.at_level(logging.INFO, logger="dinowm"):
        train(["--resume", str(tmp_path / "a"), "--training.max_steps", "2", "--optim.predictor_lr", "1e-5"])
    assert "resume: optim.predictor_lr 0.002 -> 1e-05 (configured now)" in caplog.text
    lr = load_checkpoint(tmp_path / "a")["optimizers"]["predictor"]["param_groups"][0]["lr"]
    assert 0 < lr <= 1e-5  # the new base rate, times the schedule's factor (warmup) at that step


def test_resume_refuses_another_schedule(dataset, tmp_path):
    run(dataset, tmp_path / "a", "--training.max_steps", "1")
    with pytest.raises(ConfigError, match="learning-rate schedule"):
        train(["--resume", str(tmp_path / "a"), "--optim.schedule", "constant"])


def test_ac_without_decoder(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "--training.epochs", "1", "--model.ac_decoder", "false")
    val = records(out, "val")[0]
    assert "rollout_h1_z_visual_l1" in val and "rollout_h1_psnr" not in val and "val_decoder_recon_loss" not in val
    assert set(load_checkpoint(out)["optimizers"]) == {"predictor"}
    result = evaluate_main([str(out), "--horizon", "2", "--max-samples", "2"])  # latent metrics; no image grid
    assert len(result["metrics"]["model"]["z_visual_mse"]) == 2 and not (out / "eval" / "rollout_grid.png").exists()


@pytest.mark.parametrize("family", ["vit", "ac"])
def test_inspect_prints_every_stage_of_one_batch_and_exits(dataset, tmp_path, capsys, family):
    common = ["--data.path", str(dataset), "--data.demo_episodes", "0", "--out", str(tmp_path / "run"), "--inspect"]
    if family == "ac":
        train(["--config", "demo_ac.toml", "--data.num_hist", "3", *common, *AC_TINY])
    else:
        train(["--config", "demo.toml", *common, *TINY])
    lines = capsys.readouterr().out.splitlines()
    stages = [line.split()[0] for line in lines[1:]]
    expected = {"vit": ["encoder <- in 0", "encoder.blocks.11", "predictor <- in 0", "predictor.transformer.layers.0.0",
                        "predictor.transformer.norm", "decoder.dec", "loss"],
                "ac": ["encoder <- in 0", "predictor <- in 0", "predictor.embed_tap", "predictor.action_encoder",
                       "predictor.state_encoder", "predictor.predictor_blocks.0", "predictor.predictor_blocks.1",
                       "predictor.predictor_norm", "predictor.predictor_proj", "decoder.dec", "z_tf_loss",
                       "copy_last_loss"]}[family]
    text = "\n".join(lines)
    for name in expected:
        assert any(line.startswith(name) for line in lines), (name, text)
    positions = [next(i for i, line in enumerate(lines) if line.startswith(n)) for n in expected[:-2]]
    assert positions == sorted(positions), text  # execution order
    assert all("min" in line and "std" in line for line in lines[1:] if "loss" not in line.split()[0])
    if family == "ac":  # teacher forcing on the interleaved sequence: 3 frames x (2 + 4 patches) tokens
        block = next(line for line in lines if line.startswith("predictor.predictor_blocks.0 "))
        assert "[4, 18, 48]" in block
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def other_arm(dataset):
    """The fixture's dataset as another robot's: 7-d actions, 14-d states."""
    for name, width in (("actions.pth", 7), ("states.pth", 14)):
        torch.save(torch.load(dataset / name)[..., :width].clone(), dataset / name)
    return dataset


def test_other_action_and_state_widths_come_from_the_files_and_are_checked(tmp_path):
    franka = write_franka_dataset(tmp_path / "franka", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    arm = other_arm(write_franka_dataset(tmp_path / "arm", lengths=(20, 16, 24, 18, 22), hw=(32, 32)))
    with pytest.raises(DatasetError, match=r"states\.pth.*set data\.state_dim = 14"):
        run(arm, tmp_path / "a", "--training.max_steps", "1")
    widths = ["--data.action_dim", "0", "--data.state_dim", "0", "--training.max_steps", "1"]
    run(arm, tmp_path / "ac", *widths)
    ckpt = load_checkpoint(tmp_path / "ac")
    assert ckpt["data_widths"] == {"state": 14, "action": 7}
    assert ckpt["model"]["predictor.action_encoder.weight"].shape == (48, 7 * 2)  # 7 per step x frameskip 2
    # evaluation rebuilds the model at the checkpoint's recorded widths (an AC checkpoint, 7-d actions)
    result = evaluate_main([str(tmp_path / "ac"), "--horizon", "1", "--max-samples", "2"])
    assert len(result["metrics"]["model"]["z_visual_mse"]) == 1 and (tmp_path / "ac" / "eval" / "metrics.json").exists()
    with pytest.raises(DatasetError, match=r"action mean/std have shapes \(7,\)/\(7,\), expected \(9,\)"):
        train(["--resume", str(tmp_path / "ac"), "--data.path", str(franka), "--training.max_steps", "2"])
    train(["--config", "demo.toml", "--data.path", str(arm), "--data.demo_episodes", "0", "--out",
           str(tmp_path / "vit"), *TINY, *widths])  # the DINO-WM family too
    assert load_checkpoint(tmp_path / "vit")["model"]["action_encoder.patch_embed.weight"].shape[1] == 7 * 2
