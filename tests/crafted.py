"""Crafted files for the "nothing we read runs code" tests: unpickling `Marker(path)` creates `path`."""
from __future__ import annotations

import pickle
from pathlib import Path


class Marker:
    """An object whose unpickling calls open(path, "w") -- i.e. runs code and leaves a file behind."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_raw_pickle(path: Path, marker: Path) -> Path:
    """A plain pickle that runs code when loaded (also a legacy torch file whose first header record does)."""
    with open(path, "wb") as f:
        pickle.dump(Marker(marker), f)
    return path
