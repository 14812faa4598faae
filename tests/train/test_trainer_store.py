"""data.device_store and training.feature_cache_dtype in real (tiny) training runs."""
import json
import logging

import pytest

from dinowm.cli import train
from franka_fixtures import write_franka_dataset
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "--model.predictor_mlp_dim", "32", "--training.dtype", "fp32", "--eval.max_batches", "1",
        "--eval.rollout_horizon", "1", "--logging.every_steps", "1", "--training.max_steps", "3",
        "--training.feature_cache", "true"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_franka_dataset(tmp_path_factory.mktemp("store") / "dset", lengths=(14, 12, 16, 12, 14))


def run(dataset, out, *extra) -> tuple[dict, dict, str]:
    """-> (train losses by step, last validation record, train.log)."""
    train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0", "--out", str(out),
           *TINY, *extra])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    val = [r for r in records if r["split"] == "val"][-1]
    return losses, val, (out / "train.log").read_text()


def test_each_store_trains_the_same_and_bf16_features_stay_close(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dinowm")  # the store decision is an info line of train.log
    host, host_val, host_log = run(dataset, tmp_path / "host", "--data.device_store", "host")
    device, device_val, device_log = run(dataset, tmp_path / "device", "--data.device_store", "device")
    assert "data store: host memory, DataLoader" in host_log and "data.device_store = host" in host_log
    assert "data store: cpu memory" in device_log and "feature cache 0.00 GiB fp32" in device_log
    # the same batches, the same features: bit-identical training, validation and rollouts
    assert sorted(host) == [1, 2, 3] and host == device
    assert host_val == {**device_val, "time": host_val["time"]}
    bf16, _, bf16_log = run(dataset, tmp_path / "bf16", "--training.feature_cache_dtype", "bf16")
    assert "feature cache 0.00 GiB bf16" in bf16_log
    assert bf16 != host and all(abs(bf16[s] - host[s]) <= 1e-2 * abs(host[s]) for s in host), (bf16, host)


@pytest.mark.gpu
def test_the_device_store_on_cuda_trains_like_the_host_store(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dinowm")
    cuda = ["--training.device", "cuda"]
    host, _, host_log = run(dataset, tmp_path / "host", *cuda, "--data.device_store", "host")
    device, _, device_log = run(dataset, tmp_path / "device", *cuda)  # auto: a tiny store fits
    assert "data store: host memory, pinned non-blocking copies" in host_log
    assert "data store: cuda memory (" in device_log
    # the same uint8 batches, resized on the GPU in both; cuDNN may pick other algorithms per run
    assert sorted(device) == sorted(host) and all(abs(device[s] - host[s]) <= 1e-5 * abs(host[s]) for s in host)
