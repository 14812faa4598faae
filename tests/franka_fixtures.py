"""Tiny Franka-format datasets (docs/contract.md §1) for tests: `write_franka_dataset(root, lengths, hw)`.

Values encode where they come from, so gathers can be checked exactly:
    actions[e, t, d] = 1000 e + 10 t + d / 10   (valid steps; padding rows are 1e6)
    states[e, t, d]  = 1000 e + 10 t + d / 100  (likewise)
    frames of episode e, step t: random values in [1, 255], pixel (0, 0) = (e + 1, t % 255 + 1, t // 255 + 1)
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

PAD = 1.0e6


def encoded_actions(n: int, t_max: int, lengths) -> torch.Tensor:
    e = torch.arange(n, dtype=torch.float32)[:, None, None]
    t = torch.arange(t_max, dtype=torch.float32)[None, :, None]
    d = torch.arange(9, dtype=torch.float32)[None, None, :]
    a = 1000 * e + 10 * t + d / 10  # (N, T_max, 9)
    for i, length in enumerate(lengths):
        a[i, length:] = PAD
    return a


def encoded_states(n: int, t_max: int, lengths) -> torch.Tensor:
    e = torch.arange(n, dtype=torch.float32)[:, None, None]
    t = torch.arange(t_max, dtype=torch.float32)[None, :, None]
    d = torch.arange(22, dtype=torch.float32)[None, None, :]
    s = 1000 * e + 10 * t + d / 100  # (N, T_max, 22)
    for i, length in enumerate(lengths):
        s[i, length:] = PAD
    return s


def encoded_frames(e: int, length: int, hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + e)
    x = torch.randint(1, 256, (length, *hw, 3), dtype=torch.uint8, generator=g)  # never all-zero
    t = torch.arange(length)
    x[:, 0, 0, 0] = e + 1
    x[:, 0, 0, 1] = t % 255 + 1
    x[:, 0, 0, 2] = t // 255 + 1
    return x


def write_franka_dataset(root: Path, lengths=(12, 9, 15), t_max: int | None = None, hw=(32, 32),
                         metadata: dict | None = None, seed: int = 0) -> Path:
    """Write a valid dataset folder with len(lengths) episodes; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in lengths]
    n, t_max = len(lengths), t_max or max(lengths)
    torch.save(encoded_states(n, t_max, lengths), root / "states.pth")
    torch.save(encoded_actions(n, t_max, lengths), root / "actions.pth")
    with open(root / "seq_lengths.pkl", "wb") as f:
        pickle.dump(lengths, f)
    with open(root / "metadata.pkl", "wb") as f:
        pickle.dump(metadata if metadata is not None else {"fps": 10, "camera": "front"}, f)
    for e, length in enumerate(lengths):
        (root / f"{e:06d}").mkdir(exist_ok=True)
        torch.save(encoded_frames(e, length, hw, seed), root / f"{e:06d}" / "obses.pth")
    return root


# ----------------------------------------------------------------------------------------------
# every validation error: (mutation of a valid 3-episode dataset (12, 9, 15 steps), file named, words)
# (tests/data/test_dataset.py checks the loader's message; tests/train/test_cli_errors.py the CLI's)


def _save(root, name, obj):
    torch.save(obj, root / name)


def _pickle(root, name, obj):
    with open(root / name, "wb") as f:
        pickle.dump(obj, f)


def _garbage(root, name):
    (root / name).write_bytes(b"\x00not a torch or pickle file\xff" * 7)


def _truncate(root, name):
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])


def _with_states(root, fn):
    s = torch.load(root / "states.pth")
    _save(root, "states.pth", fn(s))


def _with_actions(root, fn):
    a = torch.load(root / "actions.pth")
    _save(root, "actions.pth", fn(a))


def _obses(root, e):
    return torch.load(root / f"{e:06d}" / "obses.pth")


def _set(x, index, value):
    x[index] = value
    return x


CASES = {
    "missing states": (lambda r: (r / "states.pth").unlink(), "states.pth", "missing"),
    "missing actions": (lambda r: (r / "actions.pth").unlink(), "actions.pth", "missing"),
    "missing seq_lengths": (lambda r: (r / "seq_lengths.pkl").unlink(), "seq_lengths.pkl", "missing"),
    "missing metadata": (lambda r: (r / "metadata.pkl").unlink(), "metadata.pkl", "missing"),
    "missing obses": (lambda r: (r / "000001" / "obses.pth").unlink(), "000001/obses.pth", "missing"),
    "missing episode folder": (lambda r: [p.unlink() for p in (r / "000002").iterdir()] and (r / "000002").rmdir(),
                               "000002/obses.pth", "missing"),
    "states rank 2": (lambda r: _with_states(r, lambda s: s[..., 0]), "states.pth", "(N_episodes, T_max, 22)"),
    "states 21 dims": (lambda r: _with_states(r, lambda s: s[..., :21]), "states.pth", "(N_episodes, T_max, 22)"),
    "states not a tensor": (lambda r: _save(r, "states.pth", {"states": torch.zeros(3, 15, 22)}), "states.pth",
                            "expected a tensor"),
    "states bool dtype": (lambda r: _with_states(r, lambda s: s > 0), "states.pth", "float32"),
    "actions 8 dims": (lambda r: _with_actions(r, lambda a: a[..., :8]), "actions.pth", "(N_episodes, T_max, 9)"),
    "actions rank 4": (lambda r: _with_actions(r, lambda a: a[None]), "actions.pth", "(N_episodes, T_max, 9)"),
    "actions other N": (lambda r: _with_actions(r, lambda a: a[:2]), "actions.pth", "does not match states"),
    "actions other T": (lambda r: _with_actions(r, lambda a: a[:, :14]), "actions.pth", "does not match states"),
    "seq_lengths not a list": (lambda r: _pickle(r, "seq_lengths.pkl", {"0": 12}), "seq_lengths.pkl", "list of ints"),
    "seq_lengths floats": (lambda r: _pickle(r, "seq_lengths.pkl", [12.0, 9.0, 15.0]), "seq_lengths.pkl", "list of ints"),
    "seq_lengths longer": (lambda r: _pickle(r, "seq_lengths.pkl", [12, 9, 15, 4]), "seq_lengths.pkl", "longer than states"),
    "seq_lengths shorter": (lambda r: _pickle(r, "seq_lengths.pkl", [12, 9]), "seq_lengths.pkl", "shorter than states"),
    "length > T_max": (lambda r: _pickle(r, "seq_lengths.pkl", [12, 16, 15]), "seq_lengths.pkl", "outside [1, T_max = 15]"),
    "length 0": (lambda r: _pickle(r, "seq_lengths.pkl", [12, 0, 15]), "seq_lengths.pkl", "outside [1, T_max = 15]"),
    "metadata not a dict": (lambda r: _pickle(r, "metadata.pkl", ["fps", 10]), "metadata.pkl", "expected a dict"),
    "nan in states": (lambda r: _with_states(r, lambda s: _set(s, (1, 8, 4), float("nan"))), "states.pth",
                      "episode 1, step 8, dim 4"),
    "inf in actions": (lambda r: _with_actions(r, lambda a: _set(a, (2, 0, 8), float("inf"))), "actions.pth",
                       "episode 2, step 0, dim 8"),
    "obses too few frames": (lambda r: _save(r, "000001/obses.pth", _obses(r, 1)[:8]),
                             "000001/obses.pth", "8 frames but seq_lengths.pkl says episode 1 has 9"),
    "obses too many frames": (lambda r: _save(r, "000000/obses.pth", _obses(r, 0)[[*range(12), 0]]),
                              "000000/obses.pth", "13 frames"),
    "obses float": (lambda r: _save(r, "000001/obses.pth", _obses(r, 1).float() / 255),
                    "000001/obses.pth", "uint8"),
    "obses channels first": (lambda r: _save(r, "000001/obses.pth", _obses(r, 1).permute(0, 3, 1, 2)),
                             "000001/obses.pth", "(T, H, W, 3)"),
    "obses rank 3": (lambda r: _save(r, "000001/obses.pth", _obses(r, 1)[..., 0]),
                     "000001/obses.pth", "(T, H, W, 3)"),
    "inconsistent frame size": (lambda r: _save(r, "000002/obses.pth", _obses(r, 2)[:, :16]),
                                "000002/obses.pth", "differs from (32, 32)"),
    "corrupt states": (lambda r: _garbage(r, "states.pth"), "states.pth", "corrupt"),
    "truncated actions": (lambda r: _truncate(r, "actions.pth"), "actions.pth", "corrupt"),
    "corrupt seq_lengths": (lambda r: _garbage(r, "seq_lengths.pkl"), "seq_lengths.pkl", "corrupt"),
    "corrupt metadata": (lambda r: _truncate(r, "metadata.pkl"), "metadata.pkl", "corrupt"),
    "corrupt obses": (lambda r: _truncate(r, "000002/obses.pth"), "000002/obses.pth", "corrupt"),
    "obses of zero size": (lambda r: _save(r, "000001/obses.pth", _obses(r, 1)[:, :0, :0]),
                           "000001/obses.pth", "(T, H, W, 3)"),
    "sparse states": (lambda r: _with_states(r, lambda s: s.to_sparse()), "states.pth", "save a dense one"),
}
