"""Configuration: one dataclass per TOML table, validated at load.

Precedence: `--section.key value` on the command line > the TOML file > the defaults below.
Unknown sections or keys are errors with a suggestion; values are coerced to the field's type;
cross-field checks live in `Config.validate()`. Each component receives only its own section.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dinowm.errors import UserError
from dinowm.models.encoder import VARIANTS as ENCODER_VARIANTS
from kernels.dispatch import ATTENTION_BACKENDS, SIMPLE_BACKENDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError, ValueError):
    """A configuration problem, phrased for the user (file, key, value and what to do)."""


@dataclass
class DataConfig:
    path: str = ""
    """Dataset folder in the Franka format (docs/contract.md §1). Relative paths are resolved from the working directory."""
    demo_episodes: int = 0
    """If > 0 and `path` holds no dataset, generate a simulated demo dataset of this many episodes there."""
    demo_frames: int = 150
    """Frames per episode of the generated demo dataset."""
    frameskip: int = 5
    """Temporal subsampling: a sample takes every `frameskip`-th frame; actions of the skipped steps are concatenated."""
    num_hist: int = 3
    """Context frames given to the predictor."""
    num_pred: int = 1
    """Frames predicted ahead (the target is z shifted by num_pred)."""
    img_size: int = 224
    """Model image size: frames are resized to this and scaled to [-1, 1]; the decoder target."""
    proprio_start: int = 0
    """Proprio = state[..., proprio_start:proprio_end] (default: end-effector position)."""
    proprio_end: int = 3
    state_dim: int = 22
    """Width of the dataset's states: the Franka layout (22) is checked by default; another robot's width, or 0
    to take it from states.pth. Recorded in checkpoints."""
    action_dim: int = 9
    """Width of the dataset's raw actions per step: Franka 9 by default; another width, or 0 to take it from
    actions.pth. Recorded in checkpoints."""
    split_ratio: float = 0.9
    """Fraction of episodes used for training (split by episode)."""
    split_seed: int = 42
    """Seed of the episode permutation (the original uses 42)."""
    normalization: str = "train"
    """'train': z-score statistics over training episodes (valid steps, std floor 1e-6);
    'compat': over all episodes with unbiased std, as the original code."""
    num_workers: int = 0
    """DataLoader worker processes (0: batches are gathered in the main process, which is fast because frames live in memory)."""
    device_store: str = "auto"
    """Where the uint8 frame store and the feature cache live: 'device' (on the training device; batches are
    gathered and resized there, no per-step copy of images), 'host' (host memory; a DataLoader gathers batches,
    copied from pinned memory without blocking on CUDA) or 'auto' (device when it takes at most half the free
    device memory and data.num_workers = 0; the start-up log says which and why)."""


@dataclass
class ModelConfig:
    encoder_weights: str = ""
    """Path to the official DINOv2 weights of `encoder` (e.g. `dinov2_vits14_pretrain.pth`). Empty: random
    encoder (a warning says so)."""
    encoder: str = "vits14"
    """DINOv2 variant: 'vits14' (384-d features), 'vitb14' (768-d) or 'vitl14' (1024-d), official key layouts."""
    encoder_image_size: int = 224
    """Encoder input size: 224 -> 16x16 patches (default), 196 -> 14x14 (the original code)."""
    predictor: str = "vit"
    """Predictor family: 'vit' (DINO-WM ViTPredictor) or 'ac' (the V-JEPA 2-AC action-conditioned predictor;
    a clip is num_hist + 1 frames, num_pred must be 1, and the ac_* / rope_legacy / auto_steps keys apply)."""
    concat_dim: int = 1
    """1: proprio/action embeddings concatenated to every patch token; 0: as two extra tokens per frame."""
    action_emb_dim: int = 10
    proprio_emb_dim: int = 10
    predictor_depth: int = 6
    predictor_heads: int = 16
    predictor_dim_head: int = 64
    predictor_mlp_dim: int = 2048
    predictor_dropout: float = 0.1
    """Dropout on attention probabilities, attention output and MLP (docs/contract.md §5)."""
    predictor_emb_dropout: float = 0.0
    predictor_pos_init_std: float = 1.0
    """Std of the predictor's position-embedding init (1.0: N(0, 1) as the original; 0.02 starts near "copy")."""
    predictor_zero_init_residual: bool = False
    """Zero-init the last Linear of every predictor block's branches (each block starts as the identity);
    false: PyTorch's default init, as the original."""
    attention_backend: str = "auto"
    """auto | triton | sdpa | flex | flash | xformers | reference (see kernels.dispatch)."""
    layernorm_linear_backend: str = "auto"
    """auto | triton | reference."""
    embedding_backend: str = "auto"
    """auto | triton | reference."""
    ac_dim: int = 384
    """AC predictor: transformer width d."""
    ac_depth: int = 24
    """AC predictor: number of blocks."""
    ac_heads: int = 16
    """AC predictor: attention heads (head dim = ac_dim / ac_heads)."""
    ac_mlp_ratio: float = 4.0
    """AC predictor: MLP hidden width = ac_mlp_ratio * ac_dim."""
    rope_legacy: bool = False
    """AC predictor: false = true RoPE rotation (new training); true = the official code's angle layout, which
    its checkpoints were trained with."""
    auto_steps: int = 2
    """AC predictor: frames predicted autoregressively in the rollout loss (1 <= auto_steps <= num_hist)."""
    ac_decoder: bool = True
    """AC predictor: also train the image decoder (on detached latents) for images of rollouts."""


@dataclass
class TrainingConfig:
    seed: int = 0
    epochs: int = 100
    batch_size: int = 32
    max_steps: int = 0
    """Train for exactly this many optimiser steps in total, however many epochs that takes (0: `epochs` decide)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    dtype: str = "fp32"
    """fp32 | bf16 (autocast; parameters and optimiser state stay fp32)."""
    compile: bool = False
    """torch.compile the training step (dinowm/step.py): the forward with its AOTAutograd backward and the
    gradient norm / non-finite guard / clip, each one graph (fullgraph=True); the optimisers are fused
    kernels already. Validation and rollouts run eagerly."""
    cuda_graphs: bool = False
    """Capture the training step into a CUDA graph and replay it (static input buffers; logging steps,
    which decode the prediction, run uncaptured). CUDA and a single process only."""
    grad_clip: float = 0.0
    """Clip the global L2 norm of all trained gradients to this value (0: off, as the original). The norm
    before clipping is logged as grad_norm (mean over the logging window)."""
    feature_cache: bool = True
    """Cache the frozen encoder's features per frame (exact: the encoder is frozen and deterministic)."""
    feature_cache_dtype: str = "fp32"
    """fp32 (exact) | bf16 (half the memory; each feature rounded to bf16 once, relative error <= 2^-8)."""
    hang_timeout_s: float = 1800.0
    """If no training step completes for this many seconds, write all threads' stacks to train.log and exit
    with code 124 instead of freezing (a stuck DataLoader worker, a collective waiting on a dead rank). 0: off."""
    max_nonfinite_steps: int = 10
    """A step with a non-finite loss or gradient is skipped (no update); after this many in a row the run
    stops without saving, so the last good checkpoint stays the latest. The skips are counted on the
    device and checked at every logging step and before every validation and checkpoint: the run stops
    at the first check after the limit (at most logging.every_steps - 1 steps later)."""
    # speed options (README "Speed"); the defaults are the original's behaviour
    decoder_frames: int = 0
    """Train the image decoder on k of the T frames of each sample (k distinct frames drawn at random per
    sample and step). 0: all T frames (the original). The decoder only serves visualisation."""
    decoder_every_steps: int = 1
    """Train the image decoder every n-th optimiser step only (1: every step, the original)."""
    activation_checkpointing: bool = False
    """Recompute the predictor blocks' activations in the backward pass instead of keeping them (less memory,
    about one more predictor forward of compute; gradients are the same)."""
    tf32: bool = True
    """CUDA: fp32 matmuls and convolutions may use TF32 tensor cores (10-bit mantissa inputs). false: full fp32."""


@dataclass
class OptimConfig:
    predictor_lr: float = 5e-4
    predictor_weight_decay: float = 0.01
    embedding_lr: float = 5e-4
    """Action and proprio embeddings (one AdamW group)."""
    embedding_weight_decay: float = 0.01
    decoder_lr: float = 3e-4
    """Decoder: Adam, no weight decay (docs/contract.md §9)."""
    schedule: str = "constant"
    """Learning-rate schedule of every optimiser: 'constant' (the original DINO-WM), 'cosine' (linear warmup,
    cosine decay to min_lr_ratio) or 'wsd' (warmup, stable, linear decay over the last decay_fraction)."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimiser steps."""
    min_lr_ratio: float = 0.0
    """cosine / wsd: final learning rate as a fraction of the base learning rate."""
    decay_fraction: float = 0.2
    """wsd: fraction of the run spent decaying."""


@dataclass
class EvalConfig:
    every_epochs: int = 1
    """Validate every N epochs (and at the end of training)."""
    every_steps: int = 0
    """Also validate every N optimiser steps (0: only at epoch ends)."""
    max_batches: int = 0
    """Validation batches per evaluation (0: the whole validation split); > 0: a seeded random subset of
    max_batches * batch_size windows drawn across the whole split, the same at every validation."""
    rollout_episodes: int = 0
    """Validation episodes the open-loop rollout windows are drawn from (0: all)."""
    rollout_samples: int = 64
    """Rollout windows (start points) per evaluation, a seeded random subset across those episodes (0: all)."""
    rollout_horizon: int = 5
    """Predicted steps of the open-loop rollout."""


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    """Write model_latest.pt (and model_<epoch>.pt) every N epochs; also at the end and on Ctrl-C."""
    every_steps: int = 0
    """Also write a checkpoint every N optimiser steps (model_latest.pt and model_step<N>.pt; 0: only per epoch)."""
    keep_epochs: bool = True
    """Also keep numbered copies (model_<epoch>.pt, model_step<N>.pt)."""
    keep_last: int = 3
    """Numbered copies kept: the newest K (older ones are deleted; 0: keep all)."""


@dataclass
class LoggingConfig:
    every_steps: int = 10
    """Write a metrics line to metrics.jsonl every N steps."""
    image_every_epochs: int = 1
    """PNG grids (ground truth / reconstruction / prediction) every N epochs."""
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "dino_wm"
    progress_bar: bool = True


@dataclass
class ProfilingConfig:
    enabled: bool = False
    """Profile a few steps: a Chrome trace and key_averages.txt (top ops by self time) in <run>/profile/."""
    wait: int = 2
    warmup: int = 2
    active: int = 4


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)

    def validate(self) -> "Config":
        d, m, t = self.data, self.model, self.training
        _check(d.frameskip >= 1, "data.frameskip", d.frameskip, "must be >= 1")
        _check(d.num_hist >= 1, "data.num_hist", d.num_hist, "must be >= 1")
        _check(1 <= d.num_pred <= d.num_hist, "data.num_pred", d.num_pred, "must be between 1 and data.num_hist")
        _check(0.0 < d.split_ratio < 1.0, "data.split_ratio", d.split_ratio, "must be in (0, 1)")
        _check(d.state_dim >= 0, "data.state_dim", d.state_dim, "must be >= 0 (0: the width of the files)")
        _check(d.action_dim >= 0, "data.action_dim", d.action_dim, "must be >= 0 (0: the width of the files)")
        _check(d.proprio_start >= 0, "data.proprio_start", d.proprio_start, "must be >= 0")
        _check(d.proprio_start < d.proprio_end <= (d.state_dim or d.proprio_end), "data.proprio_end", d.proprio_end,
               f"proprio must be a non-empty slice data.proprio_start:proprio_end of the {d.state_dim or 'D'} state dims")
        _check_choice("data.normalization", d.normalization, ("train", "compat"))
        _check(d.img_size >= 16 and d.img_size % 16 == 0, "data.img_size", d.img_size,
               "must be a positive multiple of 16 (the decoder upsamples 16x)")
        _check(m.encoder_image_size % 14 == 0, "model.encoder_image_size", m.encoder_image_size,
               "must be a multiple of the patch size 14 (224 -> 16x16 patches, 196 -> 14x14)")
        _check_choice("model.predictor", m.predictor, ("vit", "ac"))
        _check_choice("model.encoder", m.encoder, ("vits14", "vitb14", "vitl14"))
        if m.predictor == "ac":
            _check(d.num_pred == 1, "data.num_pred", d.num_pred,
                   "must be 1 with model.predictor = 'ac' (a clip is num_hist + 1 frames; every frame predicts the next)")
            _check(1 <= m.auto_steps <= d.num_hist, "model.auto_steps", m.auto_steps,
                   f"must be between 1 and data.num_hist = {d.num_hist}")
            _check(m.ac_heads >= 1 and m.ac_dim % m.ac_heads == 0, "model.ac_dim", m.ac_dim,
                   f"must be a multiple of model.ac_heads = {m.ac_heads}")
            _check(m.ac_mlp_ratio > 0, "model.ac_mlp_ratio", m.ac_mlp_ratio, "must be > 0")
        _check_choice("model.concat_dim", m.concat_dim, (0, 1))
        if m.concat_dim == 0 and m.encoder in ENCODER_VARIANTS:
            width = ENCODER_VARIANTS[m.encoder][0]
            _check(m.action_emb_dim == m.proprio_emb_dim == width, "model.action_emb_dim", m.action_emb_dim,
                   f"with concat_dim = 0 the action and proprio embeddings are tokens: model.action_emb_dim and "
                   f"model.proprio_emb_dim must both be the {m.encoder} encoder's width {width}")
        _check_choice("model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
        _check_choice("model.layernorm_linear_backend", m.layernorm_linear_backend, SIMPLE_BACKENDS)
        _check_choice("model.embedding_backend", m.embedding_backend, SIMPLE_BACKENDS)
        _check(0.0 <= m.predictor_dropout < 1.0, "model.predictor_dropout", m.predictor_dropout, "must be in [0, 1)")
        _check_choice("training.dtype", t.dtype, ("fp32", "bf16"))
        _check_choice("training.feature_cache_dtype", t.feature_cache_dtype, ("fp32", "bf16"))
        _check_choice("data.device_store", d.device_store, ("auto", "device", "host"))
        _check(d.device_store != "device" or d.num_workers == 0, "data.device_store", d.device_store,
               f"gathers batches where the model runs, without DataLoader workers, but data.num_workers = "
               f"{d.num_workers}; set data.num_workers = 0, or data.device_store = host / auto")
        o = self.optim
        _check_choice("optim.schedule", o.schedule, ("constant", "cosine", "wsd"))
        _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
        _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
        _check(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", o.decay_fraction, "must be in (0, 1]")
        _check(t.batch_size >= 1, "training.batch_size", t.batch_size, "must be >= 1")
        _check(t.epochs >= 1, "training.epochs", t.epochs, "must be >= 1")
        _check(t.max_steps >= 0, "training.max_steps", t.max_steps, "must be >= 0 (0: no cap)")
        _check(t.hang_timeout_s >= 0, "training.hang_timeout_s", t.hang_timeout_s, "must be >= 0 (0: no watchdog)")
        _check(t.grad_clip >= 0, "training.grad_clip", t.grad_clip, "must be >= 0 (0: off)")
        _check(t.max_nonfinite_steps >= 1, "training.max_nonfinite_steps", t.max_nonfinite_steps, "must be >= 1")
        _check(0 <= t.decoder_frames <= d.num_hist + d.num_pred, "training.decoder_frames", t.decoder_frames,
               f"must be between 0 (all frames) and the {d.num_hist + d.num_pred} frames of a sample")
        _check(t.decoder_every_steps >= 1, "training.decoder_every_steps", t.decoder_every_steps, "must be >= 1")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None, "training.device",
               t.device, "must be auto, cpu, cuda or cuda:N")
        for key in ("data.demo_frames", "model.action_emb_dim", "model.proprio_emb_dim", "model.predictor_depth",
                    "model.predictor_heads", "model.predictor_dim_head", "model.predictor_mlp_dim",
                    "model.ac_dim", "model.ac_depth", "model.ac_heads",
                    "eval.every_epochs", "checkpoint.every_epochs", "logging.every_steps",
                    "logging.image_every_epochs", "profiling.active"):
            _check(self._get(key) >= 1, key, self._get(key), "must be >= 1")
        for key in ("data.demo_episodes", "data.num_workers", "eval.max_batches", "eval.rollout_episodes",
                    "eval.rollout_horizon", "eval.rollout_samples", "eval.every_steps", "checkpoint.every_steps",
                    "checkpoint.keep_last", "profiling.wait", "profiling.warmup"):
            _check(self._get(key) >= 0, key, self._get(key), "must be >= 0")
        for key in ("optim.predictor_lr", "optim.embedding_lr", "optim.decoder_lr"):
            _check(self._get(key) > 0, key, self._get(key), "must be > 0")
        for key in ("optim.predictor_weight_decay", "optim.embedding_weight_decay"):
            _check(self._get(key) >= 0, key, self._get(key), "must be >= 0")
        _check(0.0 <= m.predictor_emb_dropout < 1.0, "model.predictor_emb_dropout", m.predictor_emb_dropout,
               "must be in [0, 1)")
        _check(m.predictor_pos_init_std >= 0, "model.predictor_pos_init_std", m.predictor_pos_init_std, "must be >= 0")
        _check(m.encoder_image_size >= 14, "model.encoder_image_size", m.encoder_image_size, "must be >= 14")
        return self

    def _get(self, key: str):
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key} = {value!r} {why}")


def _check_choice(key: str, value, choices) -> None:
    _check(value in choices, key, value, f"is not one of {', '.join(map(repr, choices))}")


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(options))})"


def _coerce(value, typ, key: str):
    """Coerce a TOML or command-line value to a field type (bool, int, float, str)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # inf / nan pass every range check and break training
            return number
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config: {key} = {value!r} is not a valid {typ.__name__}")


def _section_types(section_cls) -> dict:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def apply_values(cfg: Config, values: dict, source: str) -> None:
    """Set `values` ({section: {key: value}}) on cfg, rejecting unknown sections/keys with a suggestion."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section_name, table in values.items():
        if section_name not in sections:
            raise ConfigError(f"{source}: unknown section [{section_name}]{_suggest(section_name, sections)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table of key = value")
        section = getattr(cfg, section_name)
        types = _section_types(type(section))
        for key, value in table.items():
            if key not in types:
                raise ConfigError(f"{source}: unknown key {section_name}.{key}{_suggest(key, types)}")
            setattr(section, key, _coerce(value, types[key], f"{source}: {section_name}.{key}"))


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a bare name looked up in configs/ (with or without .toml)."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.toml"):
        if candidate.exists():
            return candidate
    known = sorted(p.name for p in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"config file {str(name)!r} not found (looked here and in {CONFIG_DIR}; known: {', '.join(known)})")


def parse_overrides(args: list[str]) -> dict:
    """['--data.frameskip', '3', '--training.compile=true'] -> {'data': {'frameskip': '3'}, 'training': {...}}."""
    values: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"command line: expected --section.key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {arg} needs a value")
            value = args[i + 1]
            i += 1
        section, _, name = key.partition(".")
        values.setdefault(section, {})[name] = value
        i += 1
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults < TOML file < overrides; validated."""
    cfg = Config()
    if path is not None:
        file = resolve_config_path(path)
        try:
            with open(file, "rb") as f:
                apply_values(cfg, tomllib.load(f), str(file))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: invalid TOML: {e}") from None
    if overrides:
        values = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        apply_values(cfg, values, "command line")
    return cfg.validate()


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with `Config.to_dict()` (e.g. from a checkpoint)."""
    cfg = Config()
    apply_values(cfg, values, "checkpoint config")
    return cfg.validate()
