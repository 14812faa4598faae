"""What clusters do to runs: SIGTERM, hangs, kill -9 during checkpoint writes, NaN steps, moved or
swapped data and encoder files, optimiser overrides on resume.

The signal, hang and kill tests run training in a child process (the watchdog ends its process)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinowm.checkpoint import CheckpointError, load_checkpoint
from dinowm.cli import train
from dinowm.resilience import EXIT_HANG, EXIT_PREEMPTED, NonFiniteError
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--config", "demo.toml", "--data.demo_episodes", "0", *TINY_RUN, "--eval.max_batches", "1",
    "--eval.rollout_episodes", "0", "--logging.image_every_epochs", "100", "--logging.every_steps", "1",
    "--training.device", "cpu",
]  # 12 steps per epoch


@pytest.fixture
def dataset(tmp_path):
    return write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))


def run(dataset, out, *extra):
    return train([*TINY, "--data.path", str(dataset), "--out", str(out), *extra])


def train_steps(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["step"] for r in records if r["split"] == "train"]


def child(code: str, *args, log: Path) -> subprocess.Popen:
    """python -c code args..., from the repository root; stdout and stderr to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


TRAIN = "import sys; from dinowm.cli import main; main(sys.argv[1:])"


def wait_for(condition, proc, log: Path, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_sigterm_saves_and_resumes(dataset, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "child.log"
    proc = child(TRAIN, *TINY, "--data.path", str(dataset), "--out", str(out), log=log)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert f"python train.py --resume {out}" in output
    stopped = load_checkpoint(out)["step"]
    assert stopped >= 2 and train_steps(out) == list(range(1, stopped + 1))  # the step in flight was finished
    train(["--resume", str(out), "--training.max_steps", str(stopped + 2)])
    assert train_steps(out) == list(range(1, stopped + 3))


STALL_THIRD_BATCH = """
import sys, time
from dinowm.data.windows import FrameWindows
calls, fetch = [0], FrameWindows.batch
def stalling(self, indices):
    calls[0] += 1
    if calls[0] == 3:
        time.sleep(600)  # a DataLoader that stops delivering
    return fetch(self, indices)
FrameWindows.batch = stalling  # every loader (in place or DataLoader) gathers through it
from dinowm.cli import main
main(sys.argv[1:])
"""


def test_hang_watchdog_dumps_stacks_and_exits(dataset, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "child.log"
    proc = child(STALL_THIRD_BATCH, *TINY, "--data.path", str(dataset), "--out", str(out),
                 "--training.hang_timeout_s", "8", log=log)  # > a step on 2 busy cores
    proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == EXIT_HANG, output[-3000:]
    assert "no training progress for 8 s" in output and "DataLoader" in output
    log = (out / "train.log").read_text()
    assert "stacks of all threads" in log and "in stalling" in log  # the stuck frame, named
    assert train_steps(out) == [1, 2]


KILL_DURING_WRITES = """
import sys
from dinowm.trainer import Trainer
step = Trainer.train_step
def train_step(self, batch, decode_prediction):
    out = step(self, batch, decode_prediction)
    self.step += 1  # save the state after this step as the loop would, continuously
    self.batch_in_epoch += 1
    self.save()
    self.step -= 1
    self.batch_in_epoch -= 1
    return out
Trainer.train_step = train_step
from dinowm.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_never_corrupts_the_latest(dataset, tmp_path):
    out = tmp_path / "run"
    folder = out / "checkpoints"
    latest = folder / "model_latest.pt"
    for attempt, delay in enumerate((0.0, 0.01, 0.05)):
        args = ["--resume", str(out)] if latest.exists() else [*TINY, "--data.path", str(dataset), "--out", str(out)]
        before = latest.stat().st_mtime_ns if latest.exists() else None
        log = tmp_path / f"child{attempt}.log"
        proc = child(KILL_DURING_WRITES, *args, "--training.max_steps", "1000", log=log)
        # a write in progress after the first one of this process: a temporary file next to the latest
        wait_for(lambda: latest.exists() and latest.stat().st_mtime_ns != before
                 and any(folder.glob(".model_latest.pt.*.tmp")), proc, log)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        ckpt = load_checkpoint(out)  # always loads
        assert ckpt["step"] >= 1, attempt
    step = load_checkpoint(out)["step"]
    train(["--resume", str(out), "--training.max_steps", str(step + 1)])
    assert load_checkpoint(out)["step"] == step + 1
    assert not list(folder.glob(".*.tmp"))  # leftovers of killed writes are removed on start


def test_nonfinite_steps_are_skipped_then_stop_the_run(dataset, tmp_path, monkeypatch):
    from dinowm.models.world_model import VWorldModel

    nan_steps = set()
    forward, calls = VWorldModel.forward, [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] in nan_steps:
                out["z_loss"] = out["z_loss"] * float("nan")
                out["loss"] = out["z_loss"] + out["decoder_recon_loss"]
        return out

    monkeypatch.setattr(VWorldModel, "forward", poisoned)
    run(dataset, tmp_path / "run", "--training.max_steps", "1")
    before = load_checkpoint(tmp_path / "run")
    nan_steps.update({2, 3})  # two in a row: skipped, not fatal
    train(["--resume", str(tmp_path / "run"), "--training.max_steps", "3",
                "--training.max_nonfinite_steps", "3"])
    after = load_checkpoint(tmp_path / "run")
    assert after["step"] == 3 and after["nonfinite_skips"] == 2 and after["nonfinite_run"] == 2
    for key, value in before["model"].items():  # no update happened
        assert torch.equal(value, after["model"][key]), key
    assert after["optimizers"]["predictor"]["state"][0]["step"] == before["optimizers"]["predictor"]["state"][0]["step"]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    skipped = {r["step"]: r for r in records if r["split"] == "train" and r["step"] > 1}
    assert skipped[3]["nonfinite_skips"] == 2 and "loss" not in skipped[3]  # NaN never enters the averages

    nan_steps.add(4)  # the third in a row: the run saved at step 3 counts on (before the epoch ends at step 12)
    with pytest.raises(NonFiniteError, match=r"step 4: 3 consecutive .*z_loss.*intact"):
        train(["--resume", str(tmp_path / "run"), "--training.max_steps", "10",
               "--training.max_nonfinite_steps", "3"])
    assert load_checkpoint(tmp_path / "run")["step"] == 3  # the last good checkpoint, untouched


@pytest.mark.slow
def test_resume_checks_dataset_and_encoder_fingerprints(dataset, tmp_path):
    from dinowm.config import load_config
    from dinowm.models.world_model import build_world_model

    cfg = load_config("demo.toml", [*TINY[2:], "--data.path", str(dataset)])
    encoder = tmp_path / "enc" / "dinov2.pth"
    encoder.parent.mkdir()
    torch.manual_seed(1)  # not the encoder a run draws from training.seed
    torch.save(build_world_model(cfg.model, cfg.data).encoder.state_dict(), encoder)
    run(dataset, tmp_path / "run", "--training.max_steps", "1", "--model.encoder_weights", str(encoder))

    moved_data, moved_encoder = tmp_path / "moved" / "dset", tmp_path / "moved" / "dinov2.pth"
    shutil.copytree(dataset, moved_data)
    shutil.copy(encoder, moved_encoder)
    train(["--resume", str(tmp_path / "run"), "--training.max_steps", "2", "--data.path", str(moved_data),
                "--model.encoder_weights", str(moved_encoder)])  # same contents elsewhere: accepted
    assert load_checkpoint(tmp_path / "run")["step"] == 2

    other = write_franka_dataset(tmp_path / "other", lengths=(20, 16, 24, 18, 23), hw=(32, 32))
    with pytest.raises(CheckpointError, match="seq_lengths"):
        train(["--resume", str(tmp_path / "run"), "--data.path", str(other)])
    changed = shutil.copytree(dataset, tmp_path / "changed")
    states = torch.load(changed / "states.pth")
    states[0, 0, 0] += 1.0
    torch.save(states, changed / "states.pth")
    with pytest.raises(CheckpointError, match="other states or actions"):
        train(["--resume", str(tmp_path / "run"), "--data.path", str(changed)])
    weights = torch.load(moved_encoder)
    weights["norm.bias"] += 1e-3
    torch.save(weights, moved_encoder)
    with pytest.raises(CheckpointError, match="differs from the encoder this run was trained with"):
        train(["--resume", str(tmp_path / "run"), "--model.encoder_weights", str(moved_encoder)])
    from dinowm.eval import EvalError, main as evaluate  # the evaluation checks the encoder too

    with pytest.raises(EvalError, match="is not the encoder this run was trained with"):
        evaluate([str(tmp_path / "run"), "--model.encoder_weights", str(moved_encoder), "--horizon", "1",
                  "--max-samples", "2", "--no-untrained", "--out", str(tmp_path / "eval")])
    with pytest.raises(CheckpointError, match="randomly initialised encoder"):
        train(["--resume", str(tmp_path / "run"), "--model.encoder_weights", ""])


def test_optimiser_overrides_apply_on_resume_and_metrics_are_not_logged_twice(dataset, tmp_path):
    out = tmp_path / "run"
    run(dataset, out, "--training.max_steps", "2")
    with open(out / "metrics.jsonl", "a") as f:  # what a run killed after its checkpoint left behind
        f.write(json.dumps({"step": 3, "split": "train", "loss": 1.0}) + "\n" + '{"step": 4, "spl')
    train(["--resume", str(out), "--training.max_steps", "3", "--optim.predictor_lr", "1e-3",
                "--optim.decoder_lr", "2e-4", "--optim.embedding_weight_decay", "0.5"])
    groups = {name: opt["param_groups"][0] for name, opt in load_checkpoint(out)["optimizers"].items()}
    assert groups["predictor"]["lr"] == 1e-3 and groups["decoder"]["lr"] == 2e-4
    assert groups["embeddings"]["weight_decay"] == 0.5 and groups["embeddings"]["lr"] == 5e-4
    assert train_steps(out) == [1, 2, 3]
