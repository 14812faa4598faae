"""Fingerprints of what defines a run beyond its config: the dataset and the frozen encoder's weights.

A resumed run may read its data from another folder or its encoder from a moved file (the config
allows changing those paths); it may not silently train on different data or features. The
checkpoint records

    dataset   {"episodes": N, "seq_lengths": [...], "states_actions_sha256": hex}
              (valid rows of states and actions; frames are not hashed: reading 2 GB on every resume
              costs more than a changed recording with identical states and actions is likely)
    encoder   sha256 of the encoder's state dict (names, dtypes, shapes, bytes)

as plain strings and integers, and `check` refuses a resume whose fingerprints differ.
"""
from __future__ import annotations

import hashlib

import torch


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def dataset_fingerprint(ds) -> dict:
    """ds: a FrankaDataset."""
    h = hashlib.sha256()
    for i, n in enumerate(ds.seq_lengths):
        _update(h, ds.states[i, :n])
        _update(h, ds.actions[i, :n])
    return {"episodes": ds.num_episodes, "seq_lengths": [int(n) for n in ds.seq_lengths],
            "states_actions_sha256": h.hexdigest()}


def weights_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


def check(what: str, saved: dict, current: dict, data_path: str, encoder_path: str) -> None:
    """Raise ValueError (one line: what differs and what to do) unless fingerprint `what` ("dataset" or
    "encoder") agrees."""
    old, new = saved["dataset"], current["dataset"]
    if what == "dataset" and old != new:
        if old["episodes"] != new["episodes"]:
            what = f"{new['episodes']} episodes instead of {old['episodes']}"
        elif old["seq_lengths"] != new["seq_lengths"]:
            what = "other episode lengths (seq_lengths)"
        else:
            what = "other states or actions"
        raise ValueError(f"--resume: data.path {data_path!r} holds {what} than the dataset this run was trained "
                         f"on; resume with the original dataset, or start a new run from the checkpoint with --init-from")
    if what == "encoder" and saved["encoder"] != current["encoder"]:
        source = f"model.encoder_weights {encoder_path!r}" if encoder_path else "the randomly initialised encoder"
        raise ValueError(f"--resume: {source} differs from the encoder this run was trained with (weights sha256 "
                         f"{current['encoder'][:12]}... instead of {saved['encoder'][:12]}...); give the original "
                         f"weights file (it may have moved), or start a new run with --init-from")
