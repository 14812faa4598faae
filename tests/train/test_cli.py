"""Entry points as a user runs them: a subprocess per case; a user error is one line, exit != 0, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from franka_fixtures import write_franka_dataset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def run_entry(args: list[str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit != 0, no traceback, and an `error:` line naming each of `names`; returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], output
    return errors[0]


def test_console_script_points_at_a_function_that_runs(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["dinowm-train"].split(":")
    result = run_entry(["-c", f"from {module} import {func}; {func}()", "--config", str(tmp_path / "nope.toml")])
    assert_one_line_error(result, "nope.toml")


def test_train_py_dataset_error_raised_while_building_the_trainer_is_one_line(tmp_path):
    data = write_franka_dataset(tmp_path / "dset", lengths=(20, 16), hw=(32, 32))
    (data / "000001" / "obses.pth").unlink()
    result = run_entry(["train.py", "--config", "demo.toml", "--data.path", str(data), "--data.demo_episodes", "0",
                        "--out", str(tmp_path / "run"), "--logging.progress_bar", "false"])
    line = assert_one_line_error(result, "000001")
    assert line.split("error: ", 1)[1] in (tmp_path / "run" / "train.log").read_text()  # the run keeps the reason


def test_importer_error_is_one_line(tmp_path):
    bad = tmp_path / "model_latest.pth"
    bad.write_bytes(b"not a checkpoint")
    result = run_entry(["-m", "dinowm.compat", "import-dino-wm", str(bad), "--out", str(tmp_path / "c.pt")])
    assert_one_line_error(result, str(bad))


def test_sim_error_is_one_line(tmp_path):
    missing = tmp_path / "no_dataset"
    result = run_entry(["-m", "dinowm.data.sim", "--preview", str(missing), "--png", str(tmp_path / "s.png")])
    assert_one_line_error(result, str(missing))
