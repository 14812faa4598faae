"""Learning-rate schedules: lr(step) = base_lr * factor(step), a pure function of the step.

    warmup (all kinds)  factor = (step + 1) / warmup_steps                  for step < warmup_steps
    constant            factor = 1
    cosine              factor = m + (1 - m) * (1 + cos(pi * u)) / 2,   u = (step - warmup) / (total - warmup)
    wsd                 factor = 1 until the last decay_fraction of the run, then linear from 1 to m

m = min_lr_ratio; u and the decay progress are clamped to [0, 1]. `total_steps` is fixed when a run
starts and stored in its checkpoints (`Schedule.to_dict`), so a resumed run (even one given more epochs
or another max_steps) follows exactly the curve it started on.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Schedule:
    kind: str  # constant | cosine | wsd
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    decay_fraction: float

    @classmethod
    def from_config(cls, optim_cfg, total_steps: int) -> "Schedule":
        return cls(optim_cfg.schedule, optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio,
                   optim_cfg.decay_fraction)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        m = self.min_lr_ratio
        if self.kind == "cosine":
            u = min(max((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0), 1.0)
            return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * u))
        if self.kind == "wsd":
            decay_steps = max(int(round(self.decay_fraction * self.total_steps)), 1)
            u = min(max((step - (self.total_steps - decay_steps)) / decay_steps, 0.0), 1.0)
            return 1.0 - (1.0 - m) * u
        return 1.0

    def same_curve(self, other: "Schedule") -> bool:
        """Same kind and parameters (total_steps aside: the saved one wins)."""
        return dataclasses.replace(self, total_steps=other.total_steps) == other
