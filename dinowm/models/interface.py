"""The small interface between a world model and its users (evaluation, planning).

Every predictor family (the DINO-WM `VWorldModel`, the V-JEPA 2-AC model) provides these members, so
the evaluator and the planner never ask which family they hold:

    context_frames                              observed frames a rollout starts from (DINO-WM: num_hist)
    encode_visual(obs)                          obs (B, T, 3, S, S) in [-1, 1] -> visual latents (B, T, P, D)
    rollout(obs0, proprio0, actions, visual0)   -> {"z": (B, T0 + H, ...)}: the encoded context (T0 frames),
                                                then one predicted latent per further action; differentiable
                                                where the family allows (gradient planning needs it; callers
                                                wrap it in no_grad when they need no gradients)
    decode(z, size)                             latents (B, T, ...) -> images (B, T, 3, size, size)
    split(z)                                    -> (visual (B, T, P, D), proprio (B, T, Ep) or None, action or None)

`encode_frames` gives the latents of observed frames through `rollout` itself (a rollout whose context
is every frame predicts nothing), so ground truth and predictions live in the same latent space.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class WorldModel(Protocol):
    context_frames: int

    def encode_visual(self, obs: torch.Tensor) -> torch.Tensor: ...

    def rollout(self, obs0: torch.Tensor, proprio0: torch.Tensor, actions: torch.Tensor,
                visual0: torch.Tensor | None = None) -> dict: ...

    def decode(self, z: torch.Tensor, size: int | None = None) -> torch.Tensor: ...

    def split(self, z: torch.Tensor) -> tuple: ...


def check_world_model(model) -> WorldModel:
    if not isinstance(model, WorldModel):
        missing = [name for name in ("context_frames", "encode_visual", "rollout", "decode", "split") if not hasattr(model, name)]
        raise TypeError(f"{type(model).__name__} is not a world model: it lacks {', '.join(missing)}")
    return model


def encode_frames(model: WorldModel, obs: torch.Tensor, proprio: torch.Tensor, actions: torch.Tensor,
                  visual: torch.Tensor | None = None) -> torch.Tensor:
    """Latents of observed frames: obs (B, T, 3, S, S), proprio (B, T, Dp), actions (B, T, Da) -> z (B, T, ...)."""
    return model.rollout(obs, proprio, actions, visual0=visual)["z"]
