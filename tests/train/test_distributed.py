"""torchrun + DDP on CPU (gloo, 2 processes) against the 1-process run with the same global batch.

fp32 and dropout 0: the two runs differ only in the order of floating-point sums (the gradient is
averaged over 2 shards instead of taken over the whole batch), so losses agree to 1e-5, not bitwise.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinowm.cli import train
from dinowm.checkpoint import load_checkpoint
from dinowm.data.windows import EpochBatchSampler
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--config", "demo.toml", "--data.demo_episodes", "0", *TINY_RUN, "--eval.max_batches", "2",
    "--eval.rollout_episodes", "0", "--logging.image_every_epochs", "100", "--logging.every_steps", "1",
    "--training.batch_size", "8", "--training.dtype", "fp32", "--model.predictor_dropout", "0",
    "--training.device", "cpu",
]  # 48 training samples: 6 global batches of 8 per epoch

# Run by torchrun: SIGTERM to rank 1 alone, during step 8 (1-based), then the normal CLI.
SIGTERM_RANK1_AT_STEP_8 = """
import os, signal, sys
from dinowm.trainer import Trainer
step = Trainer.train_step
def train_step(self, batch, decode_prediction):
    out = step(self, batch, decode_prediction)
    if self.dist.rank == 1 and self.step + 1 == 8:
        os.kill(os.getpid(), signal.SIGTERM)
    return out
Trainer.train_step = train_step
from dinowm.cli import main
main(sys.argv[1:])
"""


def records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def losses(run_dir, split="train", key="loss"):
    steps = [r["step"] for r in records(run_dir) if r["split"] == split]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r[key] for r in records(run_dir) if r["split"] == split}


def torchrun(script: Path | str, *args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_close(got: dict, want: dict, steps):
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])


def test_sampler_shards_partition_each_global_batch():
    full = EpochBatchSampler(50, 8, shuffle=True, seed=3, drop_last=False)
    shards = [EpochBatchSampler(50, 8, shuffle=True, seed=3, drop_last=False, rank=r, world_size=3) for r in range(3)]
    for s in [full, *shards]:
        s.set_epoch(2, start_batch=1)
    per_rank = [list(s) for s in shards]
    for b, batch in enumerate(full):
        got = [i for rank in per_rank for i in (rank[b] if b < len(rank) else [])]
        assert sorted(got) == sorted(batch)


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_resume_across_world_sizes(tmp_path):
    data = write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    args = [*ARGS, "--data.path", str(data)]
    train([*args, "--out", str(tmp_path / "one"), "--training.max_steps", "10"])
    one, one_val = losses(tmp_path / "one"), losses(tmp_path / "one", "val", "val_loss")

    # the first 10 steps, a validation at the epoch boundary (step 6) and at the end
    torchrun(ROOT / "train.py", *args, "--out", str(tmp_path / "two"), "--training.max_steps", "10")
    assert_close(losses(tmp_path / "two"), one, range(1, 11))
    assert_close(losses(tmp_path / "two", "val", "val_loss"), one_val, (6, 10))
    assert not list((tmp_path / "two").glob("train.rank*.log"))  # ranks > 0 write nothing

    # 1 process to step 3 (mid-epoch), 2 processes on until SIGTERM reaches rank 1 alone in step 8:
    # both stop after step 8 and rank 0 saves; then 1 process again to step 10
    train([*args, "--out", str(tmp_path / "mixed"), "--training.max_steps", "3"])
    script = tmp_path / "sigterm_rank1.py"
    script.write_text(SIGTERM_RANK1_AT_STEP_8)
    result = torchrun(script, "--resume", str(tmp_path / "mixed"), "--training.max_steps", "10", check=False)
    assert result.returncode != 0  # the workers exit 143; torchrun reports that as a failure
    assert "exitcode  : 143" in result.stdout + result.stderr, result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "mixed")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["world_size"]) == (8, 1, 2, 2)
    assert len(ckpt["rank_rng"]) == 1
    train(["--resume", str(tmp_path / "mixed"), "--training.max_steps", "10"])
    assert_close(losses(tmp_path / "mixed"), one, range(1, 11))


@pytest.mark.slow
def test_two_gloo_processes_train_the_ac_family_like_one(tmp_path):
    data = write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    args = ["--config", "demo_ac.toml", "--data.path", str(data), "--data.demo_episodes", "0",
            "--data.img_size", "32", "--model.encoder_image_size", "28", "--model.ac_dim", "48",
            "--model.ac_depth", "2", "--model.ac_heads", "2", "--data.frameskip", "2", "--data.num_hist", "3",
            "--data.split_ratio", "0.6", "--training.batch_size", "4", "--training.dtype", "fp32",
            "--eval.max_batches", "1", "--eval.rollout_episodes", "0", "--logging.every_steps", "1",
            "--logging.image_every_epochs", "100", "--logging.progress_bar", "false", "--training.device", "cpu",
            "--training.max_steps", "4"]
    train([*args, "--out", str(tmp_path / "one")])
    torchrun(ROOT / "train.py", *args, "--out", str(tmp_path / "two"))
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), range(1, 5))


@pytest.mark.slow
def test_two_gloo_processes_train_the_decoder_every_other_step_like_one(tmp_path):
    """With training.decoder_every_steps = 2 the decoder's parameters get no gradient on every other step:
    DDP must be told (find_unused_parameters), or its reducer waits for them and the next step fails."""
    data = write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    args = [*ARGS, "--data.path", str(data), "--training.decoder_every_steps", "2", "--training.max_steps", "4"]
    train([*args, "--out", str(tmp_path / "one")])
    torchrun(ROOT / "train.py", *args, "--out", str(tmp_path / "two"))
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), range(1, 5))
