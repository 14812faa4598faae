"""data.device_store: the estimate, the auto decision, and batches gathered in place equal the DataLoader's."""
import copy

import pytest
import torch

from dinowm.config import ConfigError
from dinowm.data.dataset import load_franka_dataset
from dinowm.data.normalize import NormStats
from dinowm.data.store import GiB, estimate_store_bytes, place_windows, plan_store
from dinowm.data.windows import FrameWindows, InPlaceLoader, make_loader, preprocess_images

CUDA = torch.device("cuda", 0)  # plan_store only reads device.type: no GPU needed


def stats() -> NormStats:
    g = torch.Generator().manual_seed(3)
    return NormStats(torch.randn(9, generator=g), torch.rand(9, generator=g) + 0.5,
                     torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5)


def test_estimate_counts_uint8_frames_and_features_of_the_cache_dtype():
    # the user's dataset: 9,320 frames of 224x224x3, 256 patches x 384 features
    fp32 = estimate_store_bytes(9320, (224, 224, 3), (256, 384), torch.float32)
    bf16 = estimate_store_bytes(9320, (224, 224, 3), (256, 384), torch.bfloat16)
    assert fp32["frames"] == bf16["frames"] == 9320 * 224 * 224 * 3
    assert fp32["features"] == 9320 * 256 * 384 * 4 and bf16["features"] * 2 == fp32["features"]
    assert fp32["total"] == fp32["frames"] + fp32["features"]
    assert estimate_store_bytes(10, (8, 8, 3), None, torch.float32)["features"] == 0


def test_auto_puts_the_store_on_the_device_when_it_takes_at_most_half_the_free_memory():
    assert plan_store("auto", CUDA, 3 * GiB, 70 * GiB).placement == "device"
    assert plan_store("auto", CUDA, 35 * GiB, 70 * GiB).placement == "device"  # exactly half
    tight = plan_store("auto", CUDA, 36 * GiB, 70 * GiB)
    assert tight.placement == "host" and "exceeds 50% of the 70.00 GiB free" in tight.reason
    workers = plan_store("auto", CUDA, 1 * GiB, 70 * GiB, num_workers=4)
    assert workers.placement == "host" and "num_workers = 4" in workers.reason


def test_explicit_choices_and_the_cpu():
    assert plan_store("host", CUDA, 1, 70 * GiB).placement == "host"
    assert plan_store("device", CUDA, 60 * GiB, 70 * GiB).placement == "device"  # forced past the auto budget
    with pytest.raises(ConfigError, match="data.device_store = device: the store needs 80.00 GiB .* 70.00 GiB free"):
        plan_store("device", CUDA, 80 * GiB, 70 * GiB)
    cpu = torch.device("cpu")
    assert plan_store("auto", cpu, 100 * GiB, None).placement == "device"  # host memory is the device
    assert plan_store("host", cpu, 1, None).placement == "host"
    assert plan_store("auto", cpu, 1, None, num_workers=2).placement == "host"


def _loader_batches(loader, positions):
    out = []
    for epoch, start in positions:
        loader.batch_sampler.set_epoch(epoch, start)
        out.append(list(loader))
    return out


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_in_place_batches_equal_the_dataloaders(franka_dataset, rank, world_size):
    """Same sampler order, the same start_batch on resume, the same rank shard, identical tensors."""
    ds = load_franka_dataset(franka_dataset)
    host = FrameWindows(ds, [2, 0, 1], 3, 2, stats(), slice(0, 3))
    placed = copy.deepcopy(host)
    place_windows([placed], torch.device("cpu"))
    kwargs = dict(batch_size=4, shuffle=True, seed=7, drop_last=False, rank=rank, world_size=world_size)
    old = make_loader(host, **kwargs)
    new = make_loader(placed, in_place=True, **kwargs)
    assert isinstance(new, InPlaceLoader) and len(new) == len(old)
    positions = [(0, 0), (1, 0), (1, 2)]  # two epochs, then a mid-epoch resume
    for old_epoch, new_epoch in zip(_loader_batches(old, positions), _loader_batches(new, positions)):
        assert len(old_epoch) == len(new_epoch) > 0
        for a, b in zip(old_epoch, new_epoch):
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_device_gathered_batches_equal_the_host_loaders_on_cuda(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    host = FrameWindows(ds, [2, 0, 1], 3, 2, stats(), slice(0, 3))
    device = copy.deepcopy(host)
    val = copy.deepcopy(host)
    place_windows([device, val], CUDA)
    assert device.frames.is_cuda and device.frames.data_ptr() == val.frames.data_ptr()  # moved once, shared
    kwargs = dict(batch_size=4, shuffle=True, seed=7, drop_last=False)
    old, new = make_loader(host, **kwargs), make_loader(device, in_place=True, **kwargs)
    for a, b in zip(*(_loader_batches(loader, [(0, 0), (1, 3)]) for loader in (old, new))):
        for x, y in zip(a, b):
            assert all(y[k].is_cuda and torch.equal(x[k], y[k].cpu()) for k in x)
            # the resize on the device: the same filter, rounding may differ in the last bit
            torch.testing.assert_close(preprocess_images(y["obs"], 24).cpu(), preprocess_images(x["obs"], 24),
                                       rtol=0, atol=1e-6)


def test_config_refuses_unknown_choices_and_workers_with_the_device_store():
    from dinowm.config import load_config

    with pytest.raises(ConfigError, match="data.device_store = 'gpu' is not one of 'auto', 'device', 'host'"):
        load_config(overrides=["--data.device_store", "gpu"])
    with pytest.raises(ConfigError, match="training.feature_cache_dtype = 'fp16' is not one of 'fp32', 'bf16'"):
        load_config(overrides=["--training.feature_cache_dtype", "fp16"])
    with pytest.raises(ConfigError, match="data.num_workers = 2; set data.num_workers = 0"):
        load_config(overrides=["--data.device_store", "device", "--data.num_workers", "2"])
    assert load_config(overrides=["--data.device_store", "host", "--data.num_workers", "2"]).data.num_workers == 2
