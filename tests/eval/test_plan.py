"""python -m dinowm.plan on a tiny checkpoint: open loop on the dataset, closed loop in the simulator."""
import importlib.util
import json

import pytest

from eval_helpers import cli_error
from dinowm import plan

FAST = ["--samples", "4", "--elites", "2", "--iterations", "1", "--restarts", "1", "--horizon", "2"]


def test_open_loop_on_validation_windows(tiny_run, tmp_path):
    result = plan.main([str(tiny_run), "--episodes", "2", "--goal-steps", "2", "--out", str(tmp_path), *FAST])
    assert set(result["mean_final_latent_cost"]) == {"cem", "gd", "dataset_actions", "random"}
    assert result["latency"]["cem"]["mean_ms"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["mode"] == "dataset"


@pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs mujoco (pip install -e '.[sim]')")
def test_closed_loop_in_the_simulator(tiny_run, tmp_path):
    result = plan.main([str(tiny_run), "--sim", "--episodes", "1", "--goal-steps", "2", "--execute", "1",
                        "--episode-frames", "24", "--method", "cem", "--out", str(tmp_path), *FAST])
    ep = result["episodes"][0]
    assert set(result["summary"]) == {"cem", "random", "replay"}
    assert ep["cem"]["replans"] == 2  # 2 model steps, one executed per re-plan
    assert ep["replay"]["final_distance_m"] < 1e-3  # deterministic simulator; float32 normalisation round trip
    assert (tmp_path / "episode_000.png").exists()


def test_bad_inputs_are_one_line_errors(tiny_run, tmp_path, capsys):
    assert "goal-steps" in cli_error(capsys, plan.main, tiny_run, "--goal-steps", "0", "--out", tmp_path)
    assert "lower --goal-steps" in cli_error(capsys, plan.main, tiny_run, "--goal-steps", "30", "--out", tmp_path, *FAST)
    assert "elites" in cli_error(capsys, plan.main, tiny_run, "--samples", "2", "--elites", "4", "--out", tmp_path)
    assert "no checkpoint" in cli_error(capsys, plan.main, tmp_path / "none", "--out", tmp_path)
    assert "CUDA graphs need a CUDA device" in cli_error(capsys, plan.main, tiny_run, "--cuda-graphs", "--out", tmp_path)
