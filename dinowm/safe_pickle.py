"""Reading pickles from other people's disks without running their code.

`load_pickle(path)` reads a plain pickle (the dataset's `seq_lengths.pkl` and `metadata.pkl`) with an
unpickler that resolves only builtin value types and numpy arrays/scalars/dtypes. Any other global --
a function, a class, `os.system` in a crafted `__reduce__` -- is refused before anything is called,
with a `RefusedPickle` error naming the file and the refused global.

Checkpoints are read with `torch.load(weights_only=True)` (dinowm.checkpoint); original DINO-WM
checkpoints with the importer's own restricted unpickler (dinowm.compat).
"""
from __future__ import annotations

import _compat_pickle
import builtins
import pickle
from pathlib import Path

import numpy as np

from dinowm.errors import UserError


class RefusedPickle(UserError):
    """A pickle that names a global outside the allowed set; nothing from it was executed."""


def _numpy_globals() -> dict:
    core = np._core if hasattr(np, "_core") else np.core
    allowed = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for prefix in ("numpy.core", "numpy._core"):  # names in numpy 1 and numpy 2 pickles
        allowed[f"{prefix}.multiarray._reconstruct"] = core.multiarray._reconstruct
        allowed[f"{prefix}.multiarray.scalar"] = core.multiarray.scalar
        allowed[f"{prefix}.numeric._frombuffer"] = core.numeric._frombuffer  # protocol 5 arrays
    return allowed


_BUILTINS = {f"builtins.{name}": getattr(builtins, name) for name in (
    "set", "frozenset", "complex", "bytearray", "bytes", "slice", "range", "int", "float", "str", "bool",
    "tuple", "list", "dict")}
# protocol < 3 pickles bytes as _codecs.encode(text, "latin1"): a pure function of its arguments
_ALLOWED = {**_BUILTINS, **_numpy_globals(), "_codecs.encode": __import__("_codecs").encode}


def python3_global(module: str, name: str) -> tuple[str, str]:
    """(module, "module.name") of a pickled global, with the Python 2 names of protocol-2 pickles
    (__builtin__, copy_reg) mapped as pickle itself does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return module, f"{module}.{name}"


class _ValueUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module, path = python3_global(module, name)
        if path in _ALLOWED:
            return _ALLOWED[path]
        if module.startswith("numpy.dtypes") and name.endswith("DType"):  # numpy 2 dtype classes, inert
            return getattr(np.dtypes, name)
        raise pickle.UnpicklingError(f"refused global {path!r}")


def load_pickle(path: str | Path):
    """Unpickle `path` admitting only builtin values and numpy arrays/scalars. Raises RefusedPickle for any
    other global, and lets OSError (missing file, ...) and other unpickling errors through."""
    with open(path, "rb") as f:
        try:
            return _ValueUnpickler(f).load()
        except pickle.UnpicklingError as e:
            if str(e).startswith("refused global"):
                raise RefusedPickle(f"{path}: {e}: this file may only hold builtin values and numpy arrays "
                                    f"(nothing in it was executed); re-export it with plain lists/dicts") from None
            raise
