"""One short run with the profiler on and a validation after every step: the profile files, and the
throughput records, which must not count the validations as step or data-wait time."""
import functools
import json
import time

import pytest

import dinowm.trainer
from dinowm.cli import train
from dinowm.metrics import StepTimer
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--model.predictor_mlp_dim", "32", "--training.dtype", "fp32", "--eval.max_batches", "1",
        "--eval.rollout_horizon", "1", "--logging.every_steps", "1"]
VALIDATION_S = 100.0  # what every validation adds to the timer's clock


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("observability")
    dataset = write_franka_dataset(root / "dset", lengths=(14, 12, 16, 12, 14))
    offset = [0.0]
    validate = dinowm.trainer.Trainer.validate

    def slow_validate(self, *args, **kwargs):  # a validation that takes VALIDATION_S on the timer's clock
        offset[0] += VALIDATION_S
        return validate(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        clock = lambda: time.perf_counter() + offset[0]  # noqa: E731
        mp.setattr(dinowm.trainer, "StepTimer", functools.partial(StepTimer, clock=clock))
        mp.setattr(dinowm.trainer.Trainer, "validate", slow_validate)
        train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0",
               "--out", str(root / "run"), *TINY, "--training.max_steps", "3", "--eval.every_steps", "1",
               "--profiling.enabled", "true", "--profiling.wait", "0", "--profiling.warmup", "1",
               "--profiling.active", "2"])
    return root / "run"


def test_profiling_writes_a_chrome_trace_and_a_key_averages_table(run_dir):
    (trace,) = (run_dir / "profile").glob("*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(event.get("name") == "ProfilerStep#2" for event in events)
    table = (run_dir / "profile" / "key_averages.txt").read_text()
    assert table.startswith("# top 40 ops by self CPU time") and "Self CPU" in table
    # real ops of a training step, with their measured times
    assert "aten::mm" in table or "aten::addmm" in table
    assert "aten::convolution_backward" in table or "aten::conv2d" in table  # the decoder


def test_validation_time_is_neither_step_time_nor_data_wait(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_records = {r["step"]: r for r in records if r["split"] == "train"}
    assert sorted(train_records) == [1, 2, 3]
    for step, r in train_records.items():
        # steps 2 and 3 each follow a validation inside their logging window
        assert r["excluded_s"] >= (VALIDATION_S if step > 1 else 0.0), r
        assert r["step_time_s"] < VALIDATION_S / 2 and r["samples_per_s"] > 4 / (VALIDATION_S / 2), r
        assert 0 <= r["data_wait_pct"] < 100
        assert r["tflops"] > 0 and "mfu_pct" not in r  # FLOPs counted; no known peak for a CPU
