"""The training loop, read top to bottom: build -> fit (train steps, validation, rollouts, checkpoints).

A run folder holds:

    config.toml             the resolved configuration
    metrics.jsonl           one JSON record per logging step / validation (split: train | val | rollout)
    checkpoints/            model_latest.pt (+ model_<epoch>.pt), written atomically
    train/ valid/           PNG grids: ground truth | reconstruction | prediction
    rollout/                PNG grids: ground truth vs open-loop rollout
    profile/                torch.profiler traces (when profiling.enabled)
"""
from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from dinowm.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    capture_rng_state,
    remove_stale_temp_files,
    restore_rng_state,
)
from dinowm.config import Config, ConfigError
from dinowm.data import DatasetError, FeatureCache, FrameWindows, build_data, make_loader, preprocess_images
from dinowm.data.normalize import NormStats
from dinowm.metrics import LossWindow, MetricSink, StepTimer, maybe_profile, psnr, ssim
from dinowm.models.world_model import build_world_model
from dinowm.visualize import save_grid

log = logging.getLogger("dinowm")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device: %s (training.device = auto)", device)
        return device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device = {name!r} but no CUDA device is available; use --training.device cpu")
    return torch.device(name)


def build_optimizers(model, cfg) -> dict[str, torch.optim.Optimizer]:
    """docs/contract.md §9: AdamW for the predictor and the embeddings, Adam for the decoder; the encoder is frozen."""
    groups = model.parameter_groups()
    return {
        "predictor": torch.optim.AdamW(groups["predictor"], lr=cfg.predictor_lr, weight_decay=cfg.predictor_weight_decay),
        "embeddings": torch.optim.AdamW(groups["embeddings"], lr=cfg.embedding_lr, weight_decay=cfg.embedding_weight_decay),
        "decoder": torch.optim.Adam(groups["decoder"], lr=cfg.decoder_lr),
    }


class StopOnInterrupt:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once.

    Interrupting inside an optimiser step would save half-updated parameters; a flag checked
    between steps never does.
    """

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step and saving a checkpoint (press again to abort without saving)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, checkpoint: dict | None = None,
                 init_weights: dict | None = None):
        """checkpoint: a trainer checkpoint to resume exactly; init_weights: model weights to start from
        (keys of VWorldModel.state_dict; the encoder's may be absent)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(self.run_dir / "checkpoints"):
            log.warning("removed %s, left by an interrupted checkpoint write", stale)
        t = cfg.training
        torch.manual_seed(t.seed)
        self.device = pick_device(t.device)
        self.dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32

        # data: statistics come from the checkpoint when resuming, so evaluation sees the same scale
        stats = NormStats.from_dict(checkpoint["norm_stats"]) if checkpoint else None
        self.data = build_data(cfg.data, stats=stats)
        log.info("data: %d training / %d validation episodes, %d / %d samples",
                 len(self.data.train_ids), len(self.data.val_ids), len(self.data.train), len(self.data.val))

        # model and optimisers
        self.model = build_world_model(cfg.model, cfg.data).to(self.device)
        self.optimizers = build_optimizers(self.model, cfg.optim)
        self.step = self.epoch = self.batch_in_epoch = 0
        if init_weights is not None:
            self._load_model_weights(init_weights)
        if checkpoint:
            self._load_state(checkpoint)
        if t.compile:  # Module.compile keeps the state-dict keys (no "_orig_mod." prefix)
            self.model.predictor.compile()
            self.model.decoder.compile()

        self.cache = None
        if t.feature_cache:
            self.cache = FeatureCache(self.model, self.data.dataset.frames, cfg.data.img_size, self.device,
                                      self.dtype, progress=cfg.logging.progress_bar)

        drop_last = len(self.data.train) >= t.batch_size
        self.train_loader = make_loader(self.data.train, t.batch_size, shuffle=True, seed=t.seed,
                                        drop_last=drop_last, num_workers=cfg.data.num_workers,
                                        pin_memory=self.device.type == "cuda")
        self.val_loader = make_loader(self.data.val, t.batch_size, shuffle=False, seed=t.seed, drop_last=False,
                                      num_workers=0, pin_memory=self.device.type == "cuda")
        self.sink = MetricSink(self.run_dir, cfg.to_dict(), cfg.logging.tensorboard, cfg.logging.wandb,
                               cfg.logging.wandb_project)
        if checkpoint:  # last, so that nothing after it draws random numbers
            restore_rng_state(checkpoint["rng"])

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> dict:
        """uint8 frames -> model images on the device, + cached features when enabled."""
        obs = preprocess_images(batch["obs"].to(self.device, non_blocking=True), self.cfg.data.img_size)
        inputs = {
            "obs": obs,  # (B, T, 3, S, S) in [-1, 1]
            "proprio": batch["proprio"].to(self.device, non_blocking=True),  # (B, T, Dp)
            "action": batch["action"].to(self.device, non_blocking=True),  # (B, T, 9 * frameskip)
        }
        if self.cache is not None:
            inputs["visual"] = self.cache[batch["frame_index"]]  # (B, T, P, 384)
        return inputs

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def train_step(self, batch: dict, decode_prediction: bool) -> dict:
        self.model.train()
        with self._autocast():
            out = self.model(**self._inputs(batch), decode_prediction=decode_prediction)
        out["loss"].backward()
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return out

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        steps_per_epoch = len(self.train_loader)
        total_steps = t.epochs * steps_per_epoch
        if t.max_steps:
            total_steps = min(total_steps, t.max_steps)
        timer = StepTimer(self.device)
        window = LossWindow()  # losses since the last log
        last = {}
        bar = tqdm(total=total_steps, initial=self.step, desc="train", unit="step",
                   disable=not cfg.logging.progress_bar, dynamic_ncols=True)
        with maybe_profile(cfg.profiling, self.run_dir) as profiler, StopOnInterrupt() as stop:
            while self.step < total_steps:
                self.train_loader.batch_sampler.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
                for batch in self.train_loader:
                    timer.data_ready()
                    log_step = (self.step + 1) % cfg.logging.every_steps == 0
                    out = timer.run_step(lambda: self.train_step(batch, log_step), batch["obs"].shape[0])
                    self.step += 1
                    self.batch_in_epoch += 1
                    timer.step_done(batch["obs"].shape[0])
                    if profiler is not None:
                        profiler.step()
                    window.add(out)
                    bar.update(1)
                    if log_step or self.step == total_steps:
                        last = window.mean()
                        last.update(timer.summary())
                        last["epoch"] = self.epoch + self.batch_in_epoch / steps_per_epoch
                        self.sink.write(self.step, "train", last)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{last['samples_per_s']:.1f}")
                    if self.batch_in_epoch == steps_per_epoch:  # before a Ctrl-C save: never save "end of epoch, not done"
                        self._end_of_epoch(batch, out)
                    if stop.requested:
                        bar.close()
                        path = self.save()
                        self.sink.close()
                        log.warning("interrupted at step %d; checkpoint saved to %s; continue with: "
                                    "python train.py --resume %s", self.step, path, self.run_dir)
                        raise SystemExit(130)
                    if self.step >= total_steps:
                        break
        bar.close()
        if self.batch_in_epoch:  # stopped mid-epoch by max_steps: validate, keep the position
            last.update(self.validate(images=False))
        self.save()
        self.sink.close()
        return last

    def _end_of_epoch(self, batch: dict, out: dict) -> None:
        cfg = self.cfg
        self.epoch += 1
        self.batch_in_epoch = 0
        epoch = self.epoch
        images = epoch % cfg.logging.image_every_epochs == 0
        if images:
            self._save_grid(batch, out, self.run_dir / "train" / f"train_e{epoch:05d}.png")
        if epoch % cfg.eval.every_epochs == 0 or epoch == cfg.training.epochs:
            self.validate(images=images)
        if epoch % cfg.checkpoint.every_epochs == 0 or epoch == cfg.training.epochs:
            self.save(keep_as=epoch if cfg.checkpoint.keep_epochs else None)

    # ------------------------------------------------------------------------------------------
    # validation and rollouts
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, images: bool = True) -> dict:
        self.model.eval()
        sums, count, first = defaultdict(float), 0, None
        for i, batch in enumerate(self.val_loader):
            if self.cfg.eval.max_batches and i >= self.cfg.eval.max_batches:
                break
            with self._autocast():
                out = self.model(**self._inputs(batch), decode_prediction=True)
            n = batch["obs"].shape[0]
            for k, v in out.items():
                if k.endswith("loss"):
                    sums[k] += float(v.detach()) * n
            count += n
            first = first or (batch, out)
        results = {f"val_{k}": v / max(count, 1) for k, v in sums.items()}
        results.update(self.rollout_metrics(images=images))
        self.sink.write(self.step, "val", results)
        if images and first is not None:
            self._save_grid(*first, self.run_dir / "valid" / f"valid_e{self.epoch:05d}.png")
        log.info("epoch %d step %d: %s", self.epoch, self.step,
                 ", ".join(f"{k} {v:.4f}" for k, v in results.items() if not k.startswith("rollout_h")))
        return results

    @torch.no_grad()
    def rollout_metrics(self, images: bool = True) -> dict:
        """Open-loop rollouts (docs/contract.md §8) from the start of a few validation episodes.

        Per horizon h: latent MSE of the visual and proprio channels, PSNR and SSIM of decoded frames.
        """
        cfg = self.cfg
        num_hist, horizon = cfg.data.num_hist, cfg.eval.rollout_horizon
        episodes = self.data.val_ids[: cfg.eval.rollout_episodes]
        if not episodes or horizon < 1:
            return {}
        try:
            with warnings.catch_warnings():  # episodes too short for this horizon are simply not rolled out
                warnings.simplefilter("ignore")
                windows = FrameWindows(self.data.dataset, episodes, num_frames=num_hist + horizon,
                                       frameskip=cfg.data.frameskip, stats=self.data.stats,
                                       proprio_slice=self.data.proprio_slice)
        except DatasetError:
            log.warning("validation episodes are too short for a rollout of %d steps; no rollout metrics", horizon)
            return {}
        batch = windows.batch(torch.nonzero(windows.sample_start == 0)[:, 0])  # each episode from its start
        inputs = self._inputs(batch)
        self.model.eval()
        with self._autocast():
            visual = inputs.get("visual")
            if visual is None:
                visual = self.model.encode_visual(inputs["obs"])
            truth = self.model.embed(visual, inputs["proprio"], inputs["action"])  # (B, T, P, 404)
            rolled = self.model.rollout(inputs["obs"][:, :num_hist], inputs["proprio"][:, :num_hist],
                                        inputs["action"], visual0=visual[:, :num_hist])["z"]
            decoded = self.model.decode(rolled[:, num_hist:], size=inputs["obs"].shape[-1])  # (B, H, 3, S, S)
        pred_visual, pred_proprio, _ = self.model.split(rolled.float())
        true_visual, true_proprio, _ = self.model.split(truth.float())
        results = {}
        for h in range(horizon):
            t, target = num_hist + h, inputs["obs"][:, num_hist + h]
            results[f"rollout_h{h + 1}_z_visual_err"] = float((pred_visual[:, t] - true_visual[:, t]).pow(2).mean())
            results[f"rollout_h{h + 1}_z_proprio_err"] = float((pred_proprio[:, t] - true_proprio[:, t]).pow(2).mean())
            results[f"rollout_h{h + 1}_psnr"] = float(psnr(decoded[:, h], target).mean())
            results[f"rollout_h{h + 1}_ssim"] = float(ssim(decoded[:, h], target).mean())
        for key in ("z_visual_err", "z_proprio_err", "psnr", "ssim"):
            results[f"rollout_{key}"] = sum(results[f"rollout_h{h + 1}_{key}"] for h in range(horizon)) / horizon
        if images:
            save_grid([inputs["obs"][0], torch.cat([inputs["obs"][0, :num_hist], decoded[0].float()])],
                      self.run_dir / "rollout" / f"rollout_e{self.epoch:05d}.png")
        return results

    # ------------------------------------------------------------------------------------------
    # images and checkpoints
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _save_grid(self, batch: dict, out: dict, path: Path) -> None:
        """Rows: ground truth | reconstruction | prediction (target frames) of the first sample."""
        truth = preprocess_images(batch["obs"][0], self.cfg.data.img_size)  # (T, 3, S, S)
        rows = [truth, out["recon"][0].float()]
        if "pred_image" in out:
            pred = out["pred_image"][0].float()
            pad = truth.shape[0] - pred.shape[0]  # predictions start at frame num_pred
            rows.append(torch.cat([torch.ones_like(truth[:pad]), pred]) if pad > 0 else pred)
        save_grid(rows, path)

    def state(self) -> dict:
        model_state = self.model.state_dict()
        if self.cfg.model.encoder_weights:  # reloaded from the weights file; no need to store 22M frozen params
            model_state = {k: v for k, v in model_state.items() if not k.startswith("encoder.")}
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model_state,
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "norm_stats": self.data.stats.to_dict(),
            "config": self.cfg.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": capture_rng_state(),
        }

    def save(self, keep_as: int | None = None) -> Path:
        folder = self.run_dir / "checkpoints"
        state = self.state()
        path = folder / "model_latest.pt"
        atomic_save(state, path)
        if keep_as is not None:
            atomic_save(state, folder / f"model_{keep_as}.pt")
        return path

    def _load_model_weights(self, weights: dict) -> None:
        """Load model weights; the frozen encoder's may be absent (it comes from model.encoder_weights)."""
        try:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise CheckpointError(f"the checkpoint's weights do not fit the configured model (check model.* and "
                             f"data.* settings): {str(e).splitlines()[-1].strip()}") from None
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise CheckpointError(f"the checkpoint's weights do not match the configured model: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]} (check model.* and data.* settings)")

    def _load_state(self, ckpt: dict) -> None:
        self._load_model_weights(ckpt["model"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        log.info("resumed at step %d (epoch %d, batch %d)", self.step, self.epoch, self.batch_in_epoch)

