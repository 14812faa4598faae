"""Fixtures of the data tests: tiny Franka-format datasets in tmp_path."""
from __future__ import annotations

from pathlib import Path

import pytest

from franka_fixtures import write_franka_dataset


@pytest.fixture
def franka_dataset(tmp_path) -> Path:
    """A valid tiny dataset: 3 episodes of 12, 9 and 15 steps, 32x32 frames."""
    return write_franka_dataset(tmp_path / "dset")


@pytest.fixture
def make_franka_dataset(tmp_path):
    """Factory: make_franka_dataset(name="dset", lengths=..., t_max=..., hw=...) -> root (tmp_path / name;
    an absolute name is used as is)."""
    def make(name: str = "dset", **kwargs) -> Path:
        return write_franka_dataset(tmp_path / name, **kwargs)
    return make
