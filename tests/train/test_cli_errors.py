"""Every error a user can cause, through the training command line: exit != 0, one line naming the file,
no traceback. In-process through `dinowm.cli.main` (the console script and train.py run exactly this;
tests/train/test_cli.py runs them as subprocesses): an exception that is not a user error escapes
`run_cli` and fails the test."""
from __future__ import annotations

import errno
import io
import pickle

import pytest
import torch

from crafted import Marker
from dinowm import checkpoint, cli
from franka_fixtures import CASES, write_franka_dataset
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--eval.max_batches", "1", "--eval.rollout_horizon", "1"]


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    captured = capsys.readouterr()
    assert exit_info.value.code not in (0, None)
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, captured.err
    return lines[0]


def train_args(data, out, *extra):
    return ["--config", "demo.toml", "--data.path", str(data), "--data.demo_episodes", "0", "--out", str(out),
            *TINY, *extra]


# the dataset problems a new user runs into (mutations of a valid 3-episode dataset of 12, 9, 15 steps)
DATASET_CASES = ["missing states", "missing episode folder", "obses float", "inconsistent frame size",
                 "obses too few frames", "length > T_max", "nan in states", "inf in actions", "states 21 dims",
                 "corrupt obses"]


@pytest.mark.parametrize("case", DATASET_CASES)
def test_dataset_problem(tmp_path, capsys, case):
    mutate, file, words = CASES[case]
    root = write_franka_dataset(tmp_path / "dset", lengths=(12, 9, 15))
    mutate(root)
    line = cli_error(capsys, *train_args(root, tmp_path / "run"))
    assert str(root / file) in line and words in line, line


@pytest.mark.parametrize("case", ["all episodes too short", "empty folder", "missing folder"])
def test_dataset_folder_problem(tmp_path, capsys, case):
    root = tmp_path / "dset"
    if case == "all episodes too short":
        write_franka_dataset(root, lengths=(4, 5, 3))
    elif case == "empty folder":
        root.mkdir()
    line = cli_error(capsys, *train_args(root, tmp_path / "run"))
    assert str(root) in line, line


def test_mistyped_demo_path_generates_nothing(tmp_path, capsys):
    typo = tmp_path / "dmeo"
    line = cli_error(capsys, "--config", "demo.toml", "--data.path", str(typo), "--out", str(tmp_path / "run"))
    assert str(typo) in line and "--data.demo_episodes" in line
    assert not typo.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = write_franka_dataset(root / "dset", lengths=(20, 16, 24, 18, 22))
    cli.train(train_args(data, root / "run", "--training.max_steps", "1"))
    return data, root / "run"


def test_full_disk_during_a_checkpoint_write(trained, tmp_path, capsys, monkeypatch):
    data, _ = trained
    real_fdopen = checkpoint.os.fdopen

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk(fd, mode="r", *args, **kwargs):
        real_fdopen(fd, mode).close()
        return io.BufferedWriter(Full())

    monkeypatch.setattr(checkpoint.os, "fdopen", full_disk)
    out = tmp_path / "run"
    line = cli_error(capsys, *train_args(data, out, "--training.max_steps", "1"))
    assert f"no space left on {out / 'checkpoints'}" in line, line
    assert list((out / "checkpoints").iterdir()) == []  # the temporary file is gone


def test_stale_temp_file_of_a_killed_write_is_removed(trained):
    data, run = trained
    stale = run / "checkpoints" / ".model_latest.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    cli.train(["--resume", str(run), "--training.max_steps", "2"])
    assert not stale.exists()
    assert "left by an interrupted checkpoint write" in (run / "train.log").read_text()


def test_init_from_a_file_whose_model_is_not_a_dict(trained, tmp_path, capsys):
    data, _ = trained
    bad = tmp_path / "bad.pt"
    torch.save({"format": "dinowm/1", "model": [torch.zeros(2)]}, bad)
    line = cli_error(capsys, *train_args(data, tmp_path / "run", "--init-from", str(bad)))
    assert str(bad) in line and "'model' entry" in line


@pytest.mark.parametrize("flag", ["--resume", "--init-from"])
def test_crafted_checkpoint_runs_no_code(trained, tmp_path, capsys, flag):
    data, run = trained
    ckpt = torch.load(run / "checkpoints" / "model_latest.pt", weights_only=True)
    ckpt["rng"]["python"] = Marker(tmp_path / "marker")  # anywhere in the dict
    crafted = tmp_path / "crafted.pt"
    torch.save(ckpt, crafted)
    args = ["--resume", str(crafted)] if flag == "--resume" else train_args(data, tmp_path / "run",
                                                                            "--init-from", str(crafted))
    line = cli_error(capsys, *args)
    assert str(crafted) in line and "refused" in line, line
    assert not (tmp_path / "marker").exists()


def test_dataset_pickles_run_no_code(tmp_path, capsys):
    for name in ("seq_lengths.pkl", "metadata.pkl"):
        root = write_franka_dataset(tmp_path / name / "dset", lengths=(12, 9, 15))
        with open(root / name, "wb") as f:
            pickle.dump(Marker(tmp_path / "marker"), f)
        line = cli_error(capsys, *train_args(root, tmp_path / name / "run"))
        assert str(root / name) in line and "refused global 'io.open'" in line, line
        assert not (tmp_path / "marker").exists()


def test_short_episode_warning_reaches_train_log(tmp_path):
    data = write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 5, 22))
    cli.train(train_args(data, tmp_path / "run", "--training.max_steps", "1"))
    assert "shorter than" in (tmp_path / "run" / "train.log").read_text()


def test_dataset_tensor_file_runs_no_code(tmp_path, capsys):
    root = write_franka_dataset(tmp_path / "dset", lengths=(12, 9, 15))
    torch.save({"states": Marker(tmp_path / "marker")}, root / "states.pth")
    line = cli_error(capsys, *train_args(root, tmp_path / "run"))
    assert str(root / "states.pth") in line, line
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("problem", ["crafted", "missing"])
def test_encoder_weights_file(trained, tmp_path, capsys, problem):
    data, _ = trained
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    if problem == "crafted":
        torch.save({"cls_token": Marker(tmp_path / "marker")}, weights)
    line = cli_error(capsys, *train_args(data, tmp_path / "run", "--model.encoder_weights", str(weights)))
    assert str(weights) in line, line
    assert not (tmp_path / "marker").exists()
