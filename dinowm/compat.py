"""Importers for original checkpoints, without the original code installed: DINO-WM (docs/contract.md §10)
and the V-JEPA 2-AC predictor (`import-vjepa2-ac`, see `import_vjepa2_ac_checkpoint`).

    python -m dinowm.compat import-dino-wm model_latest.pth --out converted.pt
    python -m dinowm.compat import-vjepa2-ac vjepa2-ac.pt --out converted.pt

An original `model_latest.pth` / `model_<epoch>.pth` is a `torch.save` of a dict of WHOLE pickled
modules: `epoch`, `predictor` (models.vit.ViTPredictor), `predictor_optimizer`, `decoder`
(models.vqvae.VQVAE), `decoder_optimizer`, `action_encoder`, `proprio_encoder`
(models.proprio.ProprioceptiveEmbedding), and `encoder` (models.dino.DinoV2Encoder) only when a run
trained it. Unpickling normally needs the original classes. We load it with a restricted unpickler
instead: `find_class` maps

    the original classes (models.vit.*, models.vqvae.*, models.proprio.*, models.dino.*, dinov2.*)
    and torch.nn module classes                     -> _ModuleStandIn  (collects _parameters/_buffers/_modules)
    torch optimiser classes                         -> _OptimizerStandIn (collects its state)
    accelerate.* (the original prepares its optimisers with HF accelerate: AcceleratedOptimizer,
    AcceleratorState, enums, ...), GradScaler, and class paths the caller allows
                                                    -> an inert _StandIn (collects whatever it is given)
    tensor rebuild functions, dtypes, containers    -> the real, harmless objects
    anything else                                   -> an error naming the class path

so no code of the checkpoint runs. The state dicts are rebuilt from the stand-ins (non-persistent
buffers and plain tensor attributes, like the original's CUDA attention mask, are dropped).

Output (our checkpoint format; `train.py --init-from` loads "model" and refuses missing or unexpected
keys, except the encoder's, which are absent unless the original trained the encoder):

    {"format": "dinowm/1", "source": str, "epoch": int,
     "model": {"predictor.<key>": t, "decoder.<key>": t, "action_encoder.patch_embed.weight": t, ...},
     "inferred": {"num_patches", "num_frames", "dim", "action_in", "proprio_in", "action_emb_dim",
                  "proprio_emb_dim", "concat_dim", "depth", "inner_dim", "mlp_dim", "decoder_n_embed"},
     "notes": [what the weights cannot tell, e.g. the head split]}

written atomically (`dinowm.checkpoint.atomic_save`: a temporary file, fsync, os.replace).
"""
from __future__ import annotations

import argparse
import collections
import copyreg
import importlib
import pickle
import types
import zipfile
from pathlib import Path

import torch

from dinowm.checkpoint import CHECKPOINT_FORMAT, atomic_save
from dinowm.errors import UserError, run_cli
from dinowm.safe_pickle import python3_global

REQUIRED_ENTRIES = ("epoch", "predictor", "action_encoder", "proprio_encoder")
MODEL_ENTRIES = ("predictor", "decoder", "action_encoder", "proprio_encoder", "encoder")
VISUAL_DIM = 384

# the original code's classes (gaoyuezhou/dino_wm), nested classes included
ORIGINAL_CLASSES = frozenset({
    "models.vit.ViTPredictor", "models.vit.Transformer", "models.vit.Attention", "models.vit.FeedForward",
    "models.vqvae.VQVAE", "models.vqvae.Encoder", "models.vqvae.Decoder", "models.vqvae.ResBlock",
    "models.vqvae.Quantize",
    "models.proprio.ProprioceptiveEmbedding",
    "models.dino.DinoV2Encoder",
})


class CompatError(UserError, ValueError):
    """A checkpoint that cannot be imported; the message is one line naming the file."""


class _UnknownClass(Exception):
    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


# ----------------------------------------------------------------------------------------------
# stand-ins and the restricted unpickler
# ----------------------------------------------------------------------------------------------
class _StandIn:
    class_path = "?"

    def __init__(self, *args, **kwargs):  # called by REDUCE (e.g. an enum member rebuilt from its value)
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict state, slots state)
            state = {k: v for part in state if isinstance(part, dict) for k, v in part.items()}
        self.__dict__.update(state)

    def __repr__(self):
        return f"<stand-in for {self.class_path}>"


class _ModuleStandIn(_StandIn):
    """Holds what an nn.Module pickles: _parameters, _buffers, _modules, ..."""


class _OptimizerStandIn(_StandIn):
    """Holds what a torch optimiser pickles: defaults, state, param_groups."""


# inert stand-ins: objects of the original's optimiser wrappers, never used by the importer
INERT_PREFIXES = ("accelerate.",)
INERT_CLASSES = frozenset({"torch.cuda.amp.grad_scaler.GradScaler", "torch.amp.grad_scaler.GradScaler"})


_STAND_INS: dict[str, type] = {}


def _stand_in(path: str, base: type) -> type:
    if path not in _STAND_INS:
        _STAND_INS[path] = type(path.rsplit(".", 1)[-1], (base,), {"class_path": path})
    return _STAND_INS[path]


_SAFE_GLOBALS = {
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": collections.defaultdict,
    "copyreg._reconstructor": copyreg._reconstructor,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "torch.Tensor": torch.Tensor,
}
_SAFE_GLOBALS.update({f"builtins.{t.__name__}": t for t in (
    dict, list, set, frozenset, tuple, int, float, bool, str, bytes, bytearray, complex, slice, object)})


def _torch_class(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class _RestrictedUnpickler(pickle.Unpickler):
    allowed: tuple[str, ...] = ()  # extra class paths (or module prefixes ending in '.') given by the caller

    def find_class(self, module: str, name: str):
        module, path = python3_global(module, name)
        if path in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[path]
        if path in ORIGINAL_CLASSES or module.startswith("dinov2."):
            return _stand_in(path, _ModuleStandIn)
        if path in INERT_CLASSES or module.startswith(INERT_PREFIXES) or _allowed(path, self.allowed):
            return _stand_in(path, _StandIn)
        if module.startswith("torch.nn.modules."):
            cls = _torch_class(module, name)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
                return _stand_in(path, _ModuleStandIn)
        if module.startswith("torch.optim."):
            cls = _torch_class(module, name)
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
                return _stand_in(path, _OptimizerStandIn)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise _UnknownClass(path)


def _allowed(path: str, allowed) -> bool:
    return any(path == a or (a.endswith(".") and path.startswith(a)) for a in allowed)


def _pickle_module(allowed=()) -> types.ModuleType:
    """A pickle module for torch.load(pickle_module=...) whose Unpickler is the restricted one."""
    module = types.ModuleType("dinowm_restricted_pickle")
    module.Unpickler = type("Unpickler", (_RestrictedUnpickler,), {"allowed": tuple(allowed)})
    module.load = _load_header  # legacy (non-zip) format: magic number, protocol version, sys info
    return module


class _HeaderUnpickler(pickle.Unpickler):
    """The legacy format's header records are plain values: no global is ever needed."""

    def find_class(self, module: str, name: str):
        raise _UnknownClass(f"{module}.{name}")


def _load_header(f, **kwargs):
    return _HeaderUnpickler(f, **kwargs).load()


def _is_module(obj) -> bool:
    return isinstance(obj, _StandIn) and "_parameters" in obj.__dict__ and "_modules" in obj.__dict__


# ----------------------------------------------------------------------------------------------
# state dicts from stand-ins
# ----------------------------------------------------------------------------------------------
def _state_dict(module, prefix: str = "") -> dict:
    """The state dict nn.Module.state_dict() would give, rebuilt from a stand-in's pickled fields."""
    if not _is_module(module):
        raise TypeError(f"{prefix or 'entry'} is a {type(module).__name__}, not a module")
    out = {}
    for name, p in (module.__dict__.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = module.__dict__.get("_non_persistent_buffers_set") or set()
    for name, b in (module.__dict__.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.detach()
    for name, child in (module.__dict__.get("_modules") or {}).items():
        if child is not None:
            out.update(_state_dict(child, f"{prefix}{name}."))
    return out


KNOWN_PATCHES = (196, 256)  # encoder input 196 px -> 14 x 14 patches, 224 px -> 16 x 16 (docs/contract.md §3)


def _infer(model: dict, num_frames: int | None) -> dict:
    """Model hyper-parameters from the tensor shapes (docs/contract.md §10)."""
    pos = model["predictor.pos_embedding"]  # (1, F * P, D)
    tokens, dim = pos.shape[1], pos.shape[2]
    action_w = model["action_encoder.patch_embed.weight"]  # (Ea, Da, 1)
    proprio_w = model["proprio_encoder.patch_embed.weight"]  # (Ep, Dp, 1)
    ea, ep = action_w.shape[0], proprio_w.shape[0]
    concat_dim = 1 if dim == VISUAL_DIM + ea + ep else 0
    extra = 2 if concat_dim == 0 else 0  # two conditioning tokens per frame with concat_dim 0

    if num_frames is None:
        # The original does not store num_hist. Many frame counts leave a square grid (588 tokens: 3 x 196,
        # 12 x 49, ...); only the grids of the two encoder sizes (docs/contract.md §3) are plausible, and an ambiguity
        # is an error rather than a guess.
        candidates = [f for f in range(1, tokens + 1) if tokens % f == 0 and tokens // f - extra in KNOWN_PATCHES]
        if len(candidates) != 1:
            found = ", ".join(f"{f} x {tokens // f - extra}" for f in candidates) or "none"
            raise ValueError(f"predictor.pos_embedding {tuple(pos.shape)}: cannot tell the number of frames "
                             f"(frames x patches with {KNOWN_PATCHES} patches: {found}); pass --num-frames")
        num_frames = candidates[0]
    if tokens % num_frames:
        raise ValueError(f"predictor.pos_embedding has {tokens} tokens, not a multiple of num_frames {num_frames}")
    depth = len({k.split(".")[3] for k in model if k.startswith("predictor.transformer.layers.")})
    inferred = {
        "num_patches": tokens // num_frames - extra,
        "num_frames": num_frames,
        "dim": dim,
        "action_in": action_w.shape[1],
        "proprio_in": proprio_w.shape[1],
        "action_emb_dim": ea,
        "proprio_emb_dim": ep,
        "concat_dim": concat_dim,
        "depth": depth,
        "inner_dim": model["predictor.transformer.layers.0.0.to_qkv.weight"].shape[0] // 3 if depth else 0,
        "mlp_dim": model["predictor.transformer.layers.0.1.net.1.weight"].shape[0] if depth else 0,
    }
    if "decoder.quantize_b.embed" in model:
        inferred["decoder_n_embed"] = model["decoder.quantize_b.embed"].shape[1]
    return inferred


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _is_torchscript_archive(path: Path) -> bool:
    """A zip holding constants.pkl: what torch.load dispatches to torch.jit.load, past any pickle_module."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        return False  # torch.load reports it


def import_dino_wm_checkpoint(path, num_frames: int | None = None, allow_classes=()) -> dict:
    """Read an original DINO-WM checkpoint into our format (see the module docstring).

    num_frames: the predictor's frame count (num_hist, 3 in the original); None infers it as the one
    count that leaves 196 or 256 patches per frame (the two encoder grids), and is an error if none or
    several do. allow_classes: further class paths (or module
    prefixes ending in '.') to unpickle as inert stand-ins, for checkpoints of modified original code.
    Raises CompatError with one line naming the file.
    """
    path = Path(path)
    if num_frames is not None and num_frames < 1:
        raise CompatError(f"--num-frames {num_frames} must be >= 1")
    if not path.is_file():
        raise CompatError(f"{path}: no such file")
    if _is_torchscript_archive(path):  # torch.load would hand it to torch.jit.load: its code would run
        raise CompatError(f"{path}: a TorchScript archive, not a DINO-WM checkpoint; refusing to load it (its "
                          f"code would run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module(allow_classes))
    except _UnknownClass as e:
        raise CompatError(f"{path}: unknown class {e.path!r} in the checkpoint (not a DINO-WM "
                          "ViTPredictor/VQVAE/ProprioceptiveEmbedding checkpoint?); refusing to load it "
                          "(--allow-class to accept it as an inert stand-in)") from None
    except Exception as e:  # noqa: BLE001 - anything torch/pickle raise means: not a checkpoint
        first_line = (str(e).splitlines() or [""])[0]
        raise CompatError(f"{path}: not a DINO-WM checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict):
        raise CompatError(f"{path}: not a DINO-WM checkpoint (a {type(ckpt).__name__}, expected a dict of modules)")
    missing = [k for k in REQUIRED_ENTRIES if k not in ckpt]
    if missing:
        raise CompatError(f"{path}: not a DINO-WM checkpoint: missing entries {', '.join(missing)} "
                          f"(has: {', '.join(map(str, ckpt)) or 'nothing'})")
    model = {}
    for entry in MODEL_ENTRIES:
        if entry not in ckpt:
            continue
        if not _is_module(ckpt[entry]):
            raise CompatError(f"{path}: entry {entry!r} is a {type(ckpt[entry]).__name__}, not a pickled module")
        try:
            state = _state_dict(ckpt[entry])
        except (TypeError, AttributeError, ValueError) as e:  # a child that is no module, a parameter no tensor
            raise CompatError(f"{path}: entry {entry!r} does not hold a model's weights ({type(e).__name__}: "
                              f"{e})") from None
        if entry == "encoder":  # models.dino.DinoV2Encoder: base_model.<official DINOv2 keys>
            state = {k.removeprefix("base_model."): v for k, v in state.items()}
        model.update({f"{entry}.{k}": v for k, v in state.items()})
    try:
        inferred = _infer(model, num_frames)
    except (KeyError, ValueError, IndexError) as e:
        raise CompatError(f"{path}: unexpected DINO-WM model layout ({type(e).__name__}: {e})") from None
    notes = [f"the head split is not in the weights: inner_dim {inferred['inner_dim']} = heads x dim_head; the "
             f"original uses 16 x 64 (model.predictor_heads, model.predictor_dim_head); another split loads the "
             f"same shapes but computes another model"]
    epoch = ckpt["epoch"]
    try:
        epoch = int(epoch.item() if isinstance(epoch, torch.Tensor) else epoch)
    except (TypeError, ValueError, RuntimeError):
        raise CompatError(f"{path}: its 'epoch' entry is not a number ({type(epoch).__name__})") from None
    return {
        "format": CHECKPOINT_FORMAT,
        "source": str(path),
        "epoch": epoch,
        "model": model,
        "inferred": inferred,
        "notes": notes,
    }


AC_PREFIXES = ("predictor_embed.", "action_encoder.", "state_encoder.", "predictor_blocks.", "predictor_norm.",
               "predictor_proj.")
AC_IGNORED = ("extrinsics_encoder.",)  # the official code defines it; the predictor never uses it here


def _ac_state_dict(obj, path: Path) -> dict:
    """The predictor state dict inside an official file: the dict itself, or its `predictor` entry."""
    if isinstance(obj, dict) and isinstance(obj.get("predictor"), dict):
        obj = obj["predictor"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise CompatError(f"{path}: expected a V-JEPA 2-AC predictor state dict or a dict with a 'predictor' "
                          f"state dict (found: {keys[:200]})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def import_vjepa2_ac_checkpoint(path) -> dict:
    """Read an official V-JEPA 2-AC predictor checkpoint (keys of `src/models/ac_predictor.py`) into our format.

    Accepts a state dict, or a dict holding one under `predictor` (other entries, e.g. the video encoder and
    optimiser, are ignored); DDP's `module.` prefixes are removed; `extrinsics_encoder.*` is dropped with a
    note. Loaded with torch.load(weights_only=True): no code in the file runs. The keys must be exactly those
    of an ACPredictor of the inferred size (listed otherwise: never a silent partial load). Output:
    {"format", "source", "model": {"predictor.<key>": t}, "inferred": {visual_dim, dim, depth, mlp_hidden,
    action_dim, state_dim}, "notes": [...]}. Official checkpoints were trained with the legacy RoPE angle
    layout: use them with model.rope_legacy = true.
    """
    from dinowm.models.ac_predictor import ACPredictor  # the models import nothing from here

    path = Path(path)
    if not path.is_file():
        raise CompatError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything torch/pickle raise means: not a plain tensor file
        first_line = (str(e).splitlines() or [""])[0]
        raise CompatError(f"{path}: cannot be read as tensors only ({type(e).__name__}: {first_line[:200]}); "
                          f"re-save the predictor's state_dict() with torch.save") from None
    state = _ac_state_dict(obj, path)
    notes = []
    ignored = sorted(k for k in state if k.startswith(AC_IGNORED))
    if ignored:
        notes.append(f"ignored {len(ignored)} extrinsics_encoder tensors (unused by this predictor)")
        state = {k: v for k, v in state.items() if k not in ignored}
    try:
        embed, fc1 = state["predictor_embed.weight"], state["predictor_blocks.0.mlp.fc1.weight"]
        inferred = {"visual_dim": int(embed.shape[1]), "dim": int(embed.shape[0]),
                    "depth": len({k.split(".")[1] for k in state if k.startswith("predictor_blocks.")}),
                    "mlp_hidden": int(fc1.shape[0]), "action_dim": int(state["action_encoder.weight"].shape[1]),
                    "state_dim": int(state["state_encoder.weight"].shape[1])}
    except (KeyError, IndexError) as e:
        raise CompatError(f"{path}: not a V-JEPA 2-AC predictor state dict (no {e}; has "
                          f"{', '.join(sorted(state))[:200]})") from None
    with torch.device("meta"):  # the expected key layout, without memory
        expected = ACPredictor(inferred["visual_dim"], inferred["action_dim"], inferred["state_dim"], grid=(1, 1),
                               dim=inferred["dim"], depth=inferred["depth"], heads=1,
                               mlp_ratio=inferred["mlp_hidden"] / inferred["dim"]).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape)
    if missing or unexpected or wrong:
        raise CompatError(f"{path}: keys do not match a V-JEPA 2-AC predictor of {inferred}: missing "
                          f"{missing or 'none'}, unexpected {unexpected or 'none'}, wrong shapes {wrong or 'none'}")
    notes.append("official checkpoints use the legacy RoPE angle layout: train/evaluate with "
                 "--model.rope_legacy true")
    notes.append("the head count is not in the weights: the official predictor uses 16 heads "
                 "(model.ac_heads, default 16); another value loads the same shapes but computes another model")
    return {"format": CHECKPOINT_FORMAT, "source": str(path),
            "model": {f"predictor.{k}": v.contiguous() for k, v in state.items()},
            "inferred": inferred, "notes": notes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinowm.compat", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-dino-wm", help="convert an original DINO-WM model_*.pth into our format")
    imp.add_argument("checkpoint", help="original model_latest.pth / model_<epoch>.pth")
    imp.add_argument("--out", required=True, help="output file (our format, e.g. converted.pt)")
    imp.add_argument("--num-frames", type=int, default=None, help="predictor frames (num_hist); default: inferred")
    imp.add_argument("--allow-class", action="append", default=[], metavar="PATH",
                     help="also unpickle this class path (or module prefix ending in '.') as an inert stand-in")
    ac = sub.add_parser("import-vjepa2-ac", help="convert an official V-JEPA 2-AC predictor checkpoint into our format")
    ac.add_argument("checkpoint", help="a predictor state dict, or a dict with a 'predictor' entry (DDP prefixes ok)")
    ac.add_argument("--out", required=True, help="output file (our format; train with --init-from)")
    args = parser.parse_args(argv)
    if args.command == "import-vjepa2-ac":
        ckpt = import_vjepa2_ac_checkpoint(args.checkpoint)
    else:
        ckpt = import_dino_wm_checkpoint(args.checkpoint, num_frames=args.num_frames, allow_classes=args.allow_class)
    atomic_save(ckpt, args.out)
    n = sum(t.numel() for t in ckpt["model"].values())
    where = f"epoch {ckpt['epoch']}, " if "epoch" in ckpt else ""
    print(f"{args.checkpoint} -> {args.out}: {where}{len(ckpt['model'])} tensors, {n:,} values; "
          f"inferred {ckpt['inferred']}")
    for note in ckpt.get("notes", []):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    run_cli(main)
