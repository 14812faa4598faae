"""Evaluate a checkpoint: how far ahead does it predict better than doing nothing?

    python -m dinowm.eval runs/demo                       # validation episodes of the run's dataset, h = 1..5
    python -m dinowm.eval runs/demo/checkpoints/model_latest.pt --horizon 8 --max-samples 256
    python -m dinowm.eval runs/demo --data.path data/other   # every episode of another dataset, same statistics

Open-loop rollouts from windows of num_hist + H frames (every `frameskip`-th step) of held-out
episodes: the model sees the first num_hist frames and all H actions, and predicts H latents. Per
horizon h = 1..H, averaged over every window (or a seeded random subset of --max-samples):

    z_visual_mse    MSE between predicted and encoded ground-truth visual latents
    z_visual_l1     mean absolute error of the same (the AC family's training metric)
    z_proprio_mse   the same for the proprio part (each model against its own embedding of the truth)
    psnr, ssim      decoded prediction vs the ground-truth frame

for three predictors on the same samples:

    model           the checkpoint
    copy_last       the last context frame repeated ("doing nothing"); its images are the decoded latent
                    of that frame, so model and baseline go through the same decoder
    untrained       the same configuration at its initialisation (training.seed), same frozen encoder

Writes <run>/eval/ (or --out): metrics.json, metrics.csv, error_vs_horizon.png, rollout_grid.png,
and prints the table. `ratio_to_copy_last` < 1 at a horizon means the model beats doing nothing there.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import warnings
from collections import defaultdict
from pathlib import Path

import torch

from dinowm import fingerprint
from dinowm.checkpoint import load_checkpoint
from dinowm.config import Config, apply_values, config_from_dict, parse_overrides
from dinowm.data import FrameWindows, build_data, preprocess_images
from dinowm.data.normalize import NormStats
from dinowm.errors import UserError, run_cli
from dinowm.metrics import psnr, ssim
from dinowm.models.interface import WorldModel, check_world_model, encode_frames
from dinowm.models.world_model import build_world_model
from dinowm.visualize import save_grid, save_line_plot

log = logging.getLogger("dinowm")

METRICS = ("z_visual_mse", "z_visual_l1", "z_proprio_mse", "psnr", "ssim")


class EvalError(UserError, ValueError):
    """Inputs that cannot be evaluated (checkpoint, dataset, horizon), phrased for the user."""


# ----------------------------------------------------------------------------------------------
# per-horizon errors of one batch (shared with the trainer's rollout metrics)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def horizon_errors(model: WorldModel, obs: torch.Tensor, proprio: torch.Tensor, action: torch.Tensor,
                   visual: torch.Tensor | None = None, images: bool = True, copy_last: bool = True) -> dict:
    """Per-sample errors of an open-loop rollout and of the copy-last-frame baseline.

    obs (B, n + H, 3, S, S) in [-1, 1], proprio (B, n + H, Dp), action (B, n + H, Da), n = model.context_frames;
    visual: optional encoder features (B, n + H, P, D) (then obs is only needed for images). Returns {"model": {metric: (B, H)},
    "copy_last": {...}} (copy_last only if asked), plus "decoded" (B, H, 3, S, S) of the model when images
    (and "copy_last_decoded", the decoded last context frame the baseline's PSNR/SSIM are of).
    """
    n = model.context_frames
    if visual is None:
        visual = model.encode_visual(obs)
    horizon = visual.shape[1] - n
    if horizon < 1:
        raise EvalError(f"need more than num_hist = {n} frames for a rollout, got {visual.shape[1]}")
    truth = encode_frames(model, obs, proprio, action, visual=visual)  # (B, n + H, ...)
    obs0 = None if obs is None else obs[:, :n]
    rolled = model.rollout(obs0, proprio[:, :n], action, visual0=visual[:, :n])["z"]  # (B, n + H, ...)
    candidates = {"model": rolled[:, n:]}
    if copy_last:
        candidates["copy_last"] = truth[:, n - 1:n].expand(-1, horizon, *truth.shape[2:])
    true_visual, true_proprio, _ = model.split(truth[:, n:].float())
    out = {}
    for name, z in candidates.items():
        pred_visual, pred_proprio, _ = model.split(z.float())
        diff = (pred_visual - true_visual).flatten(2)  # (B, H, P*D)
        errors = {"z_visual_mse": diff.pow(2).mean(2), "z_visual_l1": diff.abs().mean(2)}  # (B, H) each
        if pred_proprio is not None and true_proprio is not None:
            errors["z_proprio_mse"] = (pred_proprio - true_proprio).pow(2).flatten(2).mean(2)
        if images and getattr(model, "decoder", True) is not None:  # a model may have no decoder
            size, target = obs.shape[-1], obs[:, n:].flatten(0, 1)  # (B*H, 3, S, S)
            # copy-last decodes one frame and repeats it; the model decodes every predicted frame
            src = z[:, :1] if name == "copy_last" else z
            decoded = model.decode(src, size=size).float()  # (B, H or 1, 3, S, S)
            decoded = decoded.expand(-1, horizon, *decoded.shape[2:]).flatten(0, 1)
            errors["psnr"] = psnr(decoded, target).unflatten(0, (-1, horizon))
            errors["ssim"] = ssim(decoded, target).unflatten(0, (-1, horizon))
            out["decoded" if name == "model" else f"{name}_decoded"] = decoded.unflatten(0, (-1, horizon))
        out[name] = errors
    return out


class HorizonAverages:
    """Running sums of per-sample (B, H) errors -> means per horizon."""

    def __init__(self):
        self.sums = defaultdict(lambda: None)
        self.count = 0

    def add(self, errors: dict) -> None:
        """errors: {predictor: {metric: (B, H)}} from horizon_errors."""
        for name, metrics in errors.items():
            if name.endswith("decoded"):  # images, not metrics
                continue
            for metric, values in metrics.items():
                s = values.sum(0).double().cpu()
                key = (name, metric)
                self.sums[key] = s if self.sums[key] is None else self.sums[key] + s
        self.count += next(iter(errors["model"].values())).shape[0]

    def means(self) -> dict:
        """{predictor: {metric: [mean at h = 1..H]}}."""
        out = defaultdict(dict)
        for (name, metric), s in self.sums.items():
            out[name][metric] = (s / max(self.count, 1)).tolist()
        return dict(out)


def sample_indices(num_windows: int, max_samples: int, seed: int) -> torch.Tensor:
    """Every window, or a seeded random subset of max_samples drawn across all of them (sorted)."""
    if max_samples <= 0 or max_samples >= num_windows:
        return torch.arange(num_windows)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_windows, generator=g)[:max_samples].sort().values


# ----------------------------------------------------------------------------------------------
# loading a checkpoint as a model
# ----------------------------------------------------------------------------------------------
def load_model_weights(model: torch.nn.Module, weights: dict, source: str) -> None:
    """Load weights; the frozen encoder's may be absent (it then comes from model.encoder_weights)."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise EvalError(f"{source}: the weights do not fit the model of its config: "
                        f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise EvalError(f"{source}: the weights do not match the model of its config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")


def load_run(path: str | Path, overrides: dict | None = None, device: str = "cpu"):
    """A checkpoint (or run folder) -> (model in eval mode, Config, NormStats, checkpoint dict)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device} but no CUDA device is available here; use --device cpu")
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "norm_stats" not in ckpt:
        raise EvalError(f"{path}: the checkpoint has no config/normalisation statistics (weights-only files, e.g. "
                        f"imported ones, must be trained or fine-tuned with train.py first)")
    cfg = config_from_dict(ckpt["config"])
    if overrides:
        apply_values(cfg, overrides, "command line")
        cfg.validate()
    try:
        stats = NormStats.from_dict(ckpt["norm_stats"])
    except ValueError as e:
        raise EvalError(f"{path}: {e}") from None
    model = build_model(cfg, device, action_dim=run_action_dim(ckpt))
    load_model_weights(model, ckpt["model"], str(path))
    trained_with = ckpt.get("fingerprints", {}).get("encoder")
    if trained_with is not None and trained_with != fingerprint.weights_fingerprint(model.encoder):
        raise EvalError(f"{path}: model.encoder_weights {cfg.model.encoder_weights!r} is not the encoder this run was "
                        f"trained with (weights sha256 differ); give the original weights file with "
                        f"--model.encoder_weights PATH")
    return model.eval(), cfg, stats, ckpt


def run_action_dim(ckpt: dict) -> int:
    """The raw action width per step the run was trained on (recorded by the trainer; Franka's 9 before that)."""
    return int(ckpt.get("data_widths", {}).get("action", 9))


def build_model(cfg: Config, device: str | torch.device = "cpu", action_dim: int = 9) -> torch.nn.Module:
    """The model of cfg at its initialisation (seeded with training.seed, as the trainer builds it);
    action_dim: raw action dims per step of the run's dataset."""
    torch.manual_seed(cfg.training.seed)
    with warnings.catch_warnings():  # the random-encoder warning was shown when the run was trained
        warnings.simplefilter("ignore")
        model = build_world_model(cfg.model, cfg.data, action_dim=action_dim)
    return check_world_model(model.to(device))


def untrained_twin(model: torch.nn.Module, cfg: Config, device, action_dim: int = 9) -> torch.nn.Module:
    """The same configuration at initialisation, with the trained model's (frozen) encoder."""
    twin = build_model(cfg, device, action_dim)
    twin.encoder.load_state_dict(model.encoder.state_dict())
    return twin.eval()


# ----------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------
def evaluation_windows(cfg: Config, stats: NormStats, horizon: int, own_dataset: bool, context: int):
    """Windows of context + horizon frames: of the validation episodes (own dataset) or of all episodes."""
    data = build_data(cfg.data, stats=stats)
    episodes = data.val_ids if own_dataset else list(range(data.dataset.num_episodes))
    if not episodes:
        raise EvalError(f"{cfg.data.path}: the split leaves no validation episode (data.split_ratio = "
                        f"{cfg.data.split_ratio}); pass --data.path to evaluate on another dataset")
    num_frames = context + horizon
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        windows = FrameWindows(data.dataset, episodes, num_frames, cfg.data.frameskip, stats, data.proprio_slice,
                               allow_empty=True)
    if len(windows) == 0:
        longest = max(data.dataset.seq_lengths[e] for e in episodes)
        raise EvalError(f"{cfg.data.path}: no episode of {episodes[:8]} is long enough for --horizon {horizon}: a "
                        f"window needs (context + horizon) * frameskip = {num_frames * cfg.data.frameskip} steps, "
                        f"the longest has {longest}; lower --horizon")
    return windows, episodes


def evaluate(model, cfg: Config, windows: FrameWindows, horizon: int, max_samples: int = 0, batch_size: int = 32,
             seed: int = 0, untrained=None, dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """Mean errors per horizon of the model, copy-last and (if given) the untrained twin on the same windows."""
    idx = sample_indices(len(windows), max_samples, seed)
    averages = {"model": HorizonAverages(), "untrained": HorizonAverages()}
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def run(sample_ids):
        batch = windows.batch(sample_ids)
        obs = preprocess_images(batch["obs"].to(device), cfg.data.img_size)
        proprio, action = batch["proprio"].to(device), batch["action"].to(device)
        with autocast:
            visual = model.encode_visual(obs)
            errors = horizon_errors(model, obs, proprio, action, visual=visual)
            twin = None if untrained is None else horizon_errors(untrained, obs, proprio, action, visual=visual,
                                                                 copy_last=False)
        return obs, errors, twin

    for start in range(0, len(idx), batch_size):
        _, errors, twin = run(idx[start:start + batch_size])
        averages["model"].add(errors)
        if twin is not None:
            averages["untrained"].add(twin)
    first = None  # the image grid needs a decoder
    if "decoded" in errors:
        shown = idx[torch.tensor([len(idx) // 4, (3 * len(idx)) // 4])]  # two windows far apart for the grid
        obs, errors, twin = run(shown)
        first = {"obs": obs.cpu(), "decoded": errors["decoded"].cpu(), "copy_last": errors["copy_last_decoded"].cpu(),
                 "twin": None if twin is None else twin["decoded"].cpu()}
    means = averages["model"].means()
    if untrained is not None:
        means["untrained"] = averages["untrained"].means()["model"]
    ratio = [m / c if c > 0 else float("inf") for m, c in zip(means["model"]["z_visual_mse"],
                                                                means["copy_last"]["z_visual_mse"])]
    return {"horizon": list(range(1, horizon + 1)), "samples": len(idx), "windows": len(windows),
            "metrics": means, "ratio_to_copy_last": ratio, "beats_copy_last": [r < 1 for r in ratio],
            "_first": first}


def format_table(result: dict) -> str:
    m = result["metrics"]
    names = [n for n in ("model", "copy_last", "untrained") if n in m]
    header = ["h"] + [f"{n}:{k}" for k in ("z_visual_mse", "psnr") for n in names] + ["ratio"]
    rows = [header]
    for i, h in enumerate(result["horizon"]):
        row = [str(h)]
        for key in ("z_visual_mse", "psnr"):
            for n in names:
                values = m[n].get(key)
                row.append("-" if values is None else (f"{values[i]:.4f}" if key != "psnr" else f"{values[i]:.2f}"))
        row.append(f"{result['ratio_to_copy_last'][i]:.3f}")
        rows.append(row)
    widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def write_outputs(result: dict, out: Path, num_hist: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    first = result.pop("_first")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    m = result["metrics"]
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["horizon", "predictor", *METRICS, "ratio_to_copy_last"])
        for i, h in enumerate(result["horizon"]):
            for name, metrics in m.items():
                ratio = result["ratio_to_copy_last"][i] if name == "model" else ""
                w.writerow([h, name, *[metrics[k][i] if k in metrics else "" for k in METRICS], ratio])
    save_line_plot(result["horizon"], {name: metrics["z_visual_mse"] for name, metrics in m.items()},
                   out / "error_vs_horizon.png", xlabel="horizon h (model steps ahead)",
                   ylabel="visual latent MSE (log)", log_y=True,
                   title=f"open-loop error vs horizon ({result['samples']} windows)")
    files = {"metrics": out / "metrics.json", "table": out / "metrics.csv", "plot": out / "error_vs_horizon.png"}
    if first is not None:
        obs, decoded, twin = first["obs"], first["decoded"], first["twin"]
        horizon = decoded.shape[1]
        cols = [f"t-{num_hist - 1 - j}" if j < num_hist - 1 else "t (last seen)" for j in range(num_hist)]
        cols += [f"h={h}" for h in range(1, horizon + 1)]
        rows, labels = [], []
        blank = torch.ones_like(obs[0, :num_hist])
        for i in range(obs.shape[0]):
            rows += [obs[i], torch.cat([blank, decoded[i]])]
            labels += [f"ground truth #{i}", f"rollout #{i}"]
            if twin is not None:
                rows.append(torch.cat([blank, twin[i]]))
                labels.append(f"untrained #{i}")
            rows.append(torch.cat([blank, first["copy_last"][i]]))  # what its PSNR / SSIM are of
            labels.append(f"copy-last (decoded) #{i}")
        files["grid"] = save_grid(rows, out / "rollout_grid.png", labels, cols,
                                  title="open-loop rollout from held-out windows")
    return files


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dinowm.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder or checkpoint file written by train.py")
    parser.add_argument("--horizon", type=int, default=5, help="model steps ahead (each frameskip frames)")
    parser.add_argument("--max-samples", type=int, default=0, help="seeded random subset of windows (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    parser.add_argument("--out", help="output folder (default <run>/eval)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="autocast dtype (default: the run's training.dtype)")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained-model baseline")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.horizon < 1:
        raise EvalError(f"--horizon {args.horizon} must be >= 1")
    overrides = parse_overrides(rest)
    unknown = [f"{s}.{k}" for s, keys in overrides.items() for k in keys
               if (s, k) not in (("data", "path"), ("model", "encoder_weights"))]
    if unknown:
        raise EvalError(f"only --data.path and --model.encoder_weights (a moved weights file) can be overridden "
                        f"for evaluation, not {', '.join(unknown)}")
    model, cfg, stats, ckpt = load_run(args.checkpoint, overrides, args.device)
    own = "data" not in overrides or Path(overrides["data"]["path"]).resolve() == Path(ckpt["config"]["data"]["path"]).resolve()
    windows, episodes = evaluation_windows(cfg, stats, args.horizon, own_dataset=own, context=model.context_frames)
    untrained = None if args.no_untrained else untrained_twin(model, cfg, args.device, run_action_dim(ckpt))
    dtype = torch.bfloat16 if (args.dtype or cfg.training.dtype) == "bf16" else torch.float32
    result = evaluate(model, cfg, windows, args.horizon, args.max_samples, args.batch_size, args.seed,
                      untrained=untrained, dtype=dtype, device=args.device)
    result.update({"checkpoint": str(args.checkpoint), "step": ckpt.get("step"), "dataset": cfg.data.path,
                   "episodes": episodes, "split": "validation" if own else "all episodes",
                   "frameskip": cfg.data.frameskip, "context_frames": model.context_frames})
    src = Path(args.checkpoint)
    run_dir = src if src.is_dir() else src.parent.parent
    out = Path(args.out) if args.out else run_dir / "eval"
    files = write_outputs(result, out, model.context_frames)
    print(f"{result['samples']} windows of {result['split']} {episodes} of {cfg.data.path}, checkpoint step "
          f"{result['step']}; ratio = model / copy-last visual latent MSE (< 1: better than doing nothing)")
    print(format_table(result))
    beaten = sum(result["beats_copy_last"])
    print(f"beats copy-last at {beaten}/{len(result['horizon'])} horizons; wrote {', '.join(map(str, files.values()))}")
    return result


if __name__ == "__main__":
    run_cli(main)
