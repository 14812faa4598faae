"""Episode split, sample windows, batch sampler, loader and image preprocessing (docs/contract.md §2).

A sample of episode e (T = seq_lengths[e] valid steps) starts at s, 0 <= s <= T - F * fs (stride 1),
and takes the F = num_frames frames s, s + fs, ..., s + (F - 1) fs. The action of frame k is the
time-major concatenation of the normalised raw actions between observation k and k + 1:

    action[k] = [a[s + k fs], a[s + k fs + 1], ..., a[s + k fs + fs - 1]]      (9 fs,)

so one sample needs F * fs valid steps and an episode gives T - F * fs + 1 samples (T = 932, fs = 5,
F = 4 -> 913). Proprio is the normalised state[..., proprio_slice] at the sampled frames.

A batch is gathered with a few indexing ops (no Python loop over samples or frames) from tensors held
once in memory; `frame_index` (global row of `FrankaDataset.frames`) is the key of a feature cache.
With num_workers > 0 those tensors are moved to shared memory and the workers are spawned fresh: they
receive the tensors by handle and never read files, which avoids the DataLoader deadlock of the
original (torch.load inside forked workers).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import DatasetError, FrankaDataset
from .normalize import NormStats


def split_episodes(num_episodes: int, split_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded permutation of the episodes; the first int(split_ratio * N) train, the rest validate (as the original)."""
    perm = torch.randperm(num_episodes, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(split_ratio * num_episodes)
    return perm[:n_train], perm[n_train:]


class FrameWindows(Dataset):
    """All windows of `num_frames` frames (every `frameskip`-th step) of the given episodes.

    Samples are ordered by episode (in `episode_ids` order), then by start. Episodes shorter than
    num_frames * frameskip give no sample; they are reported with a warning and counted in
    `short_episodes`. If no episode is usable at all that is a DatasetError naming the minimum length,
    unless `allow_empty` (then a warning and len 0: e.g. a validation split or rollout windows with a
    long horizon that must not stop training).
    """

    def __init__(self, ds: FrankaDataset, episode_ids, num_frames: int, frameskip: int, stats: NormStats,
                 proprio_slice: slice, allow_empty: bool = False):
        if num_frames < 1 or frameskip < 1:
            raise ValueError(f"num_frames ({num_frames}) and frameskip ({frameskip}) must be >= 1")
        self.ds = ds
        self.episode_ids = [int(i) for i in episode_ids]
        self.num_frames = num_frames
        self.frameskip = frameskip
        self.proprio_slice = proprio_slice
        self.stats = stats
        self.span = num_frames * frameskip
        """Valid steps one sample needs."""

        # normalised per-step values of the whole dataset, computed once (padding rows are never gathered)
        stats.check(proprio_dim=ds.states[:0, :0, proprio_slice].shape[-1], action_dim=ds.actions.shape[-1])
        self.actions = stats.normalize_action(ds.actions).contiguous()  # (N, T_max, 9)
        self.proprio = stats.normalize_proprio(ds.states[..., proprio_slice]).contiguous()  # (N, T_max, Dp)

        lengths = torch.tensor([ds.seq_lengths[i] for i in self.episode_ids], dtype=torch.int64)
        counts = (lengths - self.span + 1).clamp_min(0)  # samples per episode
        self.samples_per_episode = counts.tolist()
        self.short_episodes = [e for e, c in zip(self.episode_ids, self.samples_per_episode) if c == 0]
        if self.episode_ids and len(self.short_episodes) == len(self.episode_ids) and not allow_empty:
            raise DatasetError(
                f"{ds.root}: no episode is long enough for one sample: a sample needs num_frames * frameskip = "
                f"{num_frames} * {frameskip} = {self.span} valid steps, the longest of episodes {self.episode_ids} "
                f"has {int(lengths.max())}; use longer episodes or lower data.frameskip / data.num_hist")
        if self.short_episodes:
            warnings.warn(
                f"{ds.root}: {len(self.short_episodes)} of {len(self.episode_ids)} episodes are shorter than "
                f"{self.span} steps (num_frames {num_frames} * frameskip {frameskip}) and give no sample: "
                f"episodes {self.short_episodes} with lengths {[ds.seq_lengths[e] for e in self.short_episodes]}",
                stacklevel=2)
        # the dataset tensors a batch reads (own references: `apply_` may move them, e.g. to the GPU)
        self.frames, self.states, self.frame_offsets = ds.frames, ds.states, ds.frame_offsets
        ids = torch.tensor(self.episode_ids, dtype=torch.int64)
        self.sample_episode = torch.repeat_interleave(ids, counts)  # (M,)
        first = torch.cumsum(counts, 0) - counts  # (E,) index of each episode's first sample
        self.sample_start = torch.arange(len(self.sample_episode)) - torch.repeat_interleave(first, counts)  # (M,)
        self._frame_steps = torch.arange(num_frames) * frameskip  # (F,)
        self._action_steps = torch.arange(self.span)  # (F * fs,)

    @property
    def num_short_episodes(self) -> int:
        return len(self.short_episodes)

    def __len__(self) -> int:
        return len(self.sample_episode)

    def batch(self, idx: Tensor) -> dict:
        """Gather samples idx: (B,) int64.

        Returns obs uint8 (B, F, H, W, 3) (absent if frames were not loaded), proprio float32 (B, F, Dp),
        action float32 (B, F, 9 fs), state float32 (B, F, 22) (raw), frame_index int64 (B, F),
        episode int64 (B,), start int64 (B,).
        """
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):  # checked on the host: no device sync
            raise IndexError(f"sample index out of range for {n} samples")
        idx, device = idx % max(n, 1), self.sample_episode.device  # the gather runs where the tables live
        if device.type == "cuda" and not idx.is_cuda:  # from pageable memory the copy would make the host wait
            idx = idx.pin_memory().to(device, non_blocking=True)
        ep = self.sample_episode[idx]  # (B,)
        start = self.sample_start[idx]  # (B,)
        b, f, fs = idx.shape[0], self.num_frames, self.frameskip
        t = start[:, None] + self._frame_steps[None, :]  # (B, F) step of each frame
        e = ep[:, None]  # (B, 1)
        action_t = start[:, None] + self._action_steps[None, :]  # (B, F * fs)
        action = self.actions[e, action_t].reshape(b, f, -1)  # (B, F*fs, Da) -> (B, F, fs*Da), time-major
        frame_index = self.frame_offsets[e] + t  # (B, F)
        out = {
            "proprio": self.proprio[e, t],  # (B, F, Dp)
            "action": action,
            "state": self.states[e, t],  # (B, F, 22)
            "frame_index": frame_index,
            "episode": ep,
            "start": start,
        }
        if self.frames is not None:
            out["obs"] = self.frames[frame_index]  # (B, F, H, W, 3)
        return out

    def __getitems__(self, indices: list[int]) -> dict:
        return self.batch(torch.as_tensor(indices, dtype=torch.int64))

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return {k: v[0] for k, v in self.batch(torch.tensor([i])).items()}

    _BATCH_TENSORS = ("frames", "states", "frame_offsets", "actions", "proprio", "sample_episode", "sample_start",
                      "_frame_steps", "_action_steps")

    def apply_(self, fn) -> "FrameWindows":
        """Replace every tensor a batch reads by fn(tensor) (e.g. a copy on the GPU), in place."""
        for name in self._BATCH_TENSORS:
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, fn(x))
        return self

    def share_memory_(self) -> "FrameWindows":
        """Move every tensor a batch reads to shared memory (in place) so worker processes map it, not copy it."""
        return self.apply_(lambda x: x if x.is_shared() else x.share_memory_())


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of sample indices; a fresh seeded permutation each epoch (from (seed, epoch)), reproducible.

    `set_epoch(epoch, start_batch)` selects the epoch and skips its first `start_batch` batches, for an
    exact resume mid-epoch. After a full pass the epoch advances by itself (so the order changes even if
    nobody calls set_epoch). `len()` is always the number of batches of a whole epoch.

    Several processes (rank of world_size): `batch_size` is the global batch; every rank computes the
    same order and takes every world_size-th sample of each global batch, starting at its rank. The
    position (epoch, global batches done) therefore means the same samples for any number of
    processes, and a run resumes exactly with another world size. A rank whose share of a short last
    batch is empty skips it.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call before iter(loader): with workers the loader starts prefetching at iter()."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside [0, {len(self)}] batches per epoch")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def order(self, epoch: int) -> Tensor:
        """(num_samples,) sample order of `epoch`."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        order = self.order(epoch)
        for b in range(start, len(self)):
            shard = order[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world_size]
            if len(shard):
                yield shard.tolist()
        self.epoch, self.start_batch = epoch + 1, 0


def _mix_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch); distinct epochs give unrelated permutations."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    return (x ^ (x >> 32)) % (1 << 63)


def _collate_batched(batch: dict) -> dict:
    """The windows return whole batches already (via __getitems__)."""
    return batch


class InPlaceLoader:
    """Batches gathered by index where the windows' tensors live (data.device_store = device: on the GPU,
    or in host memory on the CPU), in the calling process: per step only the sampler's indices are
    copied. The DataLoader's interface as the trainer uses it (`batch_sampler`, len, iteration)."""

    def __init__(self, windows: FrameWindows, batch_sampler: EpochBatchSampler):
        self.windows = windows
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for indices in self.batch_sampler:
            yield self.windows.batch(torch.tensor(indices, dtype=torch.int64))


def make_loader(windows: FrameWindows, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                num_workers: int = 0, pin_memory: bool = False, timeout: float = 600.0,
                multiprocessing_context: str = "spawn", rank: int = 0, world_size: int = 1,
                in_place: bool = False) -> DataLoader | InPlaceLoader:
    """A DataLoader over `windows` with an EpochBatchSampler (as `loader.batch_sampler`); with world_size > 1
    it yields this rank's shard of each global batch of `batch_size`. in_place: an InPlaceLoader instead
    (the same sampler, the same batches, gathered where the windows live; no workers, no pinning).

    With num_workers > 0 the data is first moved to shared memory and workers are started with the
    "spawn" method (a fresh interpreter: no locks or threads inherited from the trainer; the script
    must guard its entry point with `if __name__ == "__main__":`) and kept alive across epochs
    (persistent_workers, so the start-up of a few seconds is paid once). A worker only maps the shared
    tensors and gathers batches; it never reads files. A worker that delivers nothing for `timeout`
    seconds raises instead of hanging silently. Batches are identical to num_workers = 0.

    The loader has its own generator: a DataLoader iterator otherwise draws its base seed from the
    global torch RNG, which would shift dropout masks whenever an iterator is created (exact resume).
    """
    sampler = EpochBatchSampler(len(windows), batch_size, shuffle, seed, drop_last, rank, world_size)
    if in_place:
        return InPlaceLoader(windows, sampler)
    generator = torch.Generator().manual_seed(seed)
    if num_workers <= 0:
        return DataLoader(windows, batch_sampler=sampler, collate_fn=_collate_batched, pin_memory=pin_memory,
                          generator=generator)
    try:
        windows.share_memory_()
    except RuntimeError as e:
        raise RuntimeError(f"could not move the dataset to shared memory for {num_workers} DataLoader workers "
                           f"({e}); enlarge /dev/shm (docker: --shm-size) or set data.num_workers = 0") from None
    return DataLoader(windows, batch_sampler=sampler, collate_fn=_collate_batched, pin_memory=pin_memory,
                      num_workers=num_workers, multiprocessing_context=multiprocessing_context, persistent_workers=True,
                      timeout=timeout, generator=generator)


def preprocess_images(obs: Tensor, img_size: int) -> Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, img_size, img_size) in [-1, 1], on obs's device.

    x / 255 * 2 - 1, resized with bilinear interpolation WITH antialiasing (align_corners=False), as
    torchvision's Resize on tensors; no resize when H = W = img_size. Clamped to [-1, 1] (rounding of the
    filter weights can overshoot by an ulp). No ImageNet mean/std.
    """
    if obs.dtype != torch.uint8 or obs.dim() < 3 or obs.shape[-1] != 3:
        raise ValueError(f"preprocess_images expects uint8 (..., H, W, 3), got {obs.dtype} {tuple(obs.shape)}")
    lead, (h, w) = obs.shape[:-3], obs.shape[-3:-1]
    x = obs.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float()  # (M, 3, H, W)
    if (h, w) != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x / 255.0 * 2.0 - 1.0).clamp_(-1.0, 1.0)  # the resize weights sum to 1 only up to rounding
    return x.reshape(*lead, 3, img_size, img_size)  # (..., 3, S, S)
