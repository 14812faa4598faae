"""Where the Triton attention's dropout masks come from: a seed kept on the device and advanced in place.

The kernels draw keep[i, j] = philox(seed + (b*H + h) << 32, i*N + j) >= p (kernels/attention.py) from a
(1,) int64 seed tensor they read on the device. A seed drawn on the host per call would be frozen
into a captured CUDA graph (every replay would reuse the mask of the capture); so the model owns a
`DropoutSeed` whose state is advanced in place by the forward itself (`next`: a clone and an add_,
two tiny device ops that torch.compile keeps in the graph and a CUDA graph replays), and each layer
adds its own index to the value it got, so layers never share a mask. The backward gets the same seed
tensor as its forward (saved by autograd), so it regenerates the forward's mask exactly; activation
checkpointing recomputes a block from its saved inputs, the seed among them, so the recomputed mask
is the forward's too.

Reproducibility: the state starts from a value derived from `torch.initial_seed()` (the seed of the
last `torch.manual_seed`; no random numbers are consumed), so a fixed training.seed gives the same
masks. `reseed` sets it explicitly (one stream per rank), `get_states` / `set_states` read and write
every DropoutSeed of a model (checkpoints: exact resume). The state is a non-persistent buffer: it
follows `.to(device)` and is not in the state dict, so weights files are unaffected.

The other attention backends (sdpa, reference) and nn.Dropout use torch's own generator, which
torch.compile (inductor seeds its random ops from it per call) and CUDA graphs (a capture registers the
CUDA generator, each replay advances its Philox offset) already handle; they ignore this seed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_MASK62 = (1 << 62) - 1
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): spreads nearby seeds over the key space


def seed_value(seed: int) -> int:
    """The initial state for an integer seed (reproducible, non-negative int64)."""
    return (int(seed) * _MIX) & _MASK62


class DropoutSeed(nn.Module):
    """A (1,) int64 device counter the Triton attention's dropout reads: `next(n)` returns the current
    value (a new tensor) and advances the state by n in place, so n layers can use value + 0 .. n - 1."""

    def __init__(self, seed: int | None = None):
        super().__init__()
        start = seed_value(torch.initial_seed() if seed is None else seed)
        self.register_buffer("state", torch.tensor([start], dtype=torch.int64), persistent=False)

    def next(self, n: int = 1) -> torch.Tensor:
        value = self.state.clone()
        self.state.add_(n)
        return value

    def reseed(self, seed: int) -> None:
        self.state.fill_(seed_value(seed))


def seeds_of(model: nn.Module) -> list[DropoutSeed]:
    return [m for m in model.modules() if isinstance(m, DropoutSeed)]


def reseed(model: nn.Module, seed: int) -> None:
    """Restart every DropoutSeed of model from an integer seed (a stream of its own per module)."""
    for i, m in enumerate(seeds_of(model)):
        m.reseed(seed + 7919 * i)


def get_states(model: nn.Module) -> list[int]:
    """The state of every DropoutSeed of model (a host read: checkpoints only)."""
    return [int(m.state.item()) for m in seeds_of(model)]


def set_states(model: nn.Module, states: list[int]) -> None:
    modules = seeds_of(model)
    if len(states) != len(modules):
        raise ValueError(f"{len(states)} dropout seed states for a model with {len(modules)} DropoutSeed modules")
    for m, value in zip(modules, states):
        m.state.fill_(int(value))
