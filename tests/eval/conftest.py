"""A tiny trained checkpoint shared by the evaluation and planning tests (one optimiser step, seconds)."""
import pytest

from dinowm.cli import train
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--eval.max_batches", "1", "--eval.rollout_horizon", "2", "--training.max_steps", "1",
        "--training.dtype", "fp32"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dataset = write_franka_dataset(root / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    out = root / "run"
    train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
                "--out", str(out), *TINY])
    return out

