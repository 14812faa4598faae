"""A tiny trained checkpoint shared by the evaluation and planning tests (one optimiser step, seconds)."""
import pytest

from dinowm.cli import train
from franka_fixtures import write_franka_dataset

TINY = [
    "--data.img_size", "32", "--model.encoder_image_size", "28",  # 2x2 patches
    "--model.predictor_depth", "1", "--model.predictor_heads", "2", "--model.predictor_dim_head", "16",
    "--model.predictor_mlp_dim", "64", "--data.frameskip", "2", "--data.num_hist", "2",
    "--data.split_ratio", "0.6", "--training.batch_size", "4", "--eval.max_batches", "1",
    "--eval.rollout_horizon", "2", "--logging.progress_bar", "false", "--training.max_steps", "1",
    "--training.dtype", "fp32",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dataset = write_franka_dataset(root / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    out = root / "run"
    train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
                "--out", str(out), *TINY])
    return out

