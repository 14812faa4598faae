"""The training loop, read top to bottom: build -> fit (train steps, validation, rollouts, checkpoints).

A run folder holds:

    config.toml             the resolved configuration
    metrics.jsonl           one JSON record per logging step / validation (split: train | val | rollout)
    checkpoints/            model_latest.pt (+ the newest checkpoint.keep_last of model_<epoch>.pt /
                            model_step<N>.pt), written atomically
    train/ valid/           labelled PNG grids: ground truth | reconstruction | prediction
    rollout/                labelled PNG grids: ground truth | open-loop rollout | copy-last (decoded)

Every validation also logs the copy-last-frame baseline (the last context frame repeated) on the same
samples (`val_copy_last_z_visual_loss`, `rollout_h<h>_copy_last_z_visual_err`, and their ratios), so a
run shows at a glance whether it predicts better than doing nothing.
    profile/                a torch.profiler Chrome trace + key_averages.txt (when profiling.enabled)
"""
from __future__ import annotations

import logging
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dinowm import distributed, fingerprint, perf

from dinowm.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_save,
    capture_rng_state,
    remove_stale_temp_files,
    restore_rng_state,
)
from dinowm.config import Config, ConfigError
from dinowm.data import FeatureCache, FrameWindows, build_data, make_loader, preprocess_images
from dinowm.data.cache import CACHE_DTYPES
from dinowm.data.normalize import NormStats
from dinowm.data.store import StorePlan, estimate_store_bytes, free_device_bytes, place_windows, plan_store
from dinowm.eval import HorizonAverages, horizon_errors, sample_indices
from dinowm.gpu_monitor import GpuMonitor
from dinowm.metrics import MetricSink, StepTimer, maybe_profile
from dinowm.models.world_model import build_world_model
from dinowm.resilience import HangWatchdog, NonFiniteError, StopOnSignal
from dinowm.schedule import Schedule
from dinowm.step import StepStats, TrainStep, build_optimizers
from dinowm.visualize import save_grid
from kernels import dropout

log = logging.getLogger("dinowm")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """training.device -> a device; under torchrun a CUDA run uses cuda:LOCAL_RANK."""
    if name in ("auto", "cuda") and distributed.current().enabled and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device: %s (training.device = auto)", device)
        return device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device = {name!r} but no CUDA device is available; use --training.device cpu")
    return torch.device(name)


NUMBERED_CHECKPOINT = re.compile(r"model_(?:(?P<epoch>\d+)|step(?P<step>\d+))\.pt")


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, checkpoint: dict | None = None,
                 init_weights: dict | None = None):
        """checkpoint: a trainer checkpoint to resume exactly; init_weights: model weights to start from
        (keys of VWorldModel.state_dict; the encoder's may be absent)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = distributed.current()
        t = cfg.training
        if t.batch_size % self.dist.world_size:
            raise ConfigError(f"training.batch_size = {t.batch_size} is the global batch and must be divisible by the "
                              f"{self.dist.world_size} processes; choose a multiple of {self.dist.world_size}")
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temp_files(self.run_dir / "checkpoints"):
                log.warning("removed %s, left by an interrupted checkpoint write", stale)
        torch.manual_seed(t.seed)
        self.device = pick_device(t.device, self.dist.local_rank)
        self.dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32

        # data: statistics come from the checkpoint when resuming, so evaluation sees the same scale
        stats = None
        if checkpoint:
            try:
                stats = NormStats.from_dict(checkpoint.get("norm_stats", {}))
            except ValueError as e:
                raise CheckpointError(f"the --resume checkpoint of {run_dir}: {e}") from None
        self.data = build_data(cfg.data, stats=stats)
        log.info("data: %d training / %d validation episodes, %d / %d samples",
                 len(self.data.train_ids), len(self.data.val_ids), len(self.data.train), len(self.data.val))
        self.fingerprints = {"dataset": fingerprint.dataset_fingerprint(self.data.dataset)}
        if checkpoint:  # the dataset first: before the model is built
            self._check_fingerprints(checkpoint, "dataset")

        # model and optimisers
        ds = self.data.dataset  # widths of the files (the Franka layout, or another robot's); in checkpoints
        self.data_widths = {"state": int(ds.states.shape[-1]), "action": int(ds.actions.shape[-1])}
        if checkpoint and checkpoint.get("data_widths", self.data_widths) != self.data_widths:
            raise CheckpointError(f"--resume: the run was trained on state/action widths {checkpoint['data_widths']}, "
                                  f"but the dataset at data.path has {self.data_widths}; resume with that run's data")
        self.model = build_world_model(cfg.model, cfg.data, action_dim=self.data_widths["action"]).to(self.device)
        perf.configure(self.model, self.device, self.dtype, t.tf32, t.activation_checkpointing)
        self.optimizers = build_optimizers(self.model, cfg.optim)
        self.step = self.epoch = self.batch_in_epoch = 0
        if cfg.model.encoder_weights:  # before a checkpoint is loaded: of the weights file given now
            self.fingerprints["encoder"] = fingerprint.weights_fingerprint(self.model.encoder)
        self.schedule = None  # fixed below from the run length, or restored from the checkpoint
        if init_weights is not None:
            if cfg.model.encoder_weights and any(k.startswith("encoder.") for k in init_weights):
                # the frozen encoder is the weights file's (checkpoints leave it out and reload the file)
                log.info("init: model.encoder_weights is set: the encoder weights in the --init-from file are not used")
                init_weights = {k: v for k, v in init_weights.items() if not k.startswith("encoder.")}
            self._load_model_weights(init_weights, init=True)
        if checkpoint:
            self._load_state(checkpoint)
        if "encoder" not in self.fingerprints:  # a random encoder, or the one the checkpoint stored
            self.fingerprints["encoder"] = fingerprint.weights_fingerprint(self.model.encoder)
        if checkpoint:
            self._check_fingerprints(checkpoint, "encoder")
        # DDP averages the gradients of whatever trainable parameters the model has (rank 0's weights
        # and buffers are broadcast at construction; no buffer changes while training, so no broadcast per
        # step); validation and rollouts use self.model directly. With decoder_every_steps > 1 the decoder
        # gets no gradient on the steps between: DDP must look for unused parameters in those steps.
        self.train_model = self.model
        if self.dist.enabled:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=t.decoder_every_steps > 1)

        self.store = self._plan_store()
        self.cache = None
        if t.feature_cache:
            self.cache = FeatureCache(self.model, self.data.dataset.frames, cfg.data.img_size, self.device,
                                      self.dtype, progress=cfg.logging.progress_bar and self.dist.main,
                                      rank=self.dist.rank, world_size=self.dist.world_size,
                                      store_device=self.device if self.store.on_device else torch.device("cpu"),
                                      store_dtype=CACHE_DTYPES[t.feature_cache_dtype])

        drop_last = len(self.data.train) >= t.batch_size
        if self.dist.enabled and not drop_last:  # a partial global batch would give ranks unequal shares
            raise ConfigError(f"training.batch_size = {t.batch_size}: the training split has only "
                              f"{len(self.data.train)} samples, less than one global batch; lower the batch or add episodes")
        shard = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        self.train_loader = make_loader(self.data.train, t.batch_size, shuffle=True, seed=t.seed,
                                        drop_last=drop_last, num_workers=cfg.data.num_workers,
                                        pin_memory=self.device.type == "cuda", in_place=self.store.on_device,
                                        **shard)
        # validation: the whole split, or a seeded random subset across all of it (the same every time);
        # under torchrun each rank takes every world_size-th batch of it
        e = cfg.eval
        self.val_indices = sample_indices(len(self.data.val), e.max_batches * t.batch_size, t.seed)
        self.rollout_windows = self._rollout_windows()
        if self.store.on_device:  # training, validation and rollout batches are all gathered there
            place_windows([self.data.train, self.data.val, self.rollout_windows], self.device)
        self.rollout_indices = (sample_indices(len(self.rollout_windows), e.rollout_samples, t.seed)
                                if self.rollout_windows is not None else None)
        # the steps of the last validation and save (a resumed finished run is not validated again)
        self._validated_at = checkpoint.get("validated_at") if checkpoint else None
        self._saved_at = None
        if self.schedule is None:
            self.schedule = Schedule.from_config(cfg.optim, self.total_steps())
        if t.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"training.cuda_graphs = true needs a CUDA device (training.device resolves to "
                              f"{self.device}); set --training.cuda_graphs false")
        if t.cuda_graphs and self.dist.enabled:
            raise ConfigError("training.cuda_graphs = true is single-process (DDP's gradient all-reduce is not "
                              "captured); set --training.cuda_graphs false under torchrun")
        self.train_step_fn = TrainStep(self.train_model, self.optimizers, self.schedule, self.device,
                                       self.dtype, grad_clip=t.grad_clip, compile=t.compile,
                                       cuda_graphs=t.cuda_graphs)
        self._skips_reported = checkpoint.get("nonfinite_skips", 0) if checkpoint else 0
        self.flops_per_sample = checkpoint.get("flops_per_sample") if checkpoint else None  # see fit()
        self.stats = StepStats(self.device, skips=self._skips_reported,  # losses and skips, on the device
                               run=checkpoint.get("nonfinite_run", 0) if checkpoint else 0)
        self.sink = MetricSink(self.run_dir, cfg.to_dict(), cfg.logging.tensorboard, cfg.logging.wandb,
                               cfg.logging.wandb_project, enabled=self.dist.main,
                               resume_step=self.step if checkpoint else None)
        self.watchdog = HangWatchdog(0, self.run_dir / "train.log")  # the real one watches fit()
        # last, so that nothing after it draws random numbers; ranks > 0 draw their own dropout masks
        self._restore_rng(checkpoint)

    def _plan_store(self) -> StorePlan:
        """data.device_store: where the frames and the feature cache live (the estimate and the decision logged)."""
        t, ds, encoder = self.cfg.training, self.data.dataset, self.model.encoder
        feature_shape = (encoder.num_patches, encoder.emb_dim) if t.feature_cache else None
        need = estimate_store_bytes(ds.frames.shape[0], ds.frames.shape[1:], feature_shape,
                                    CACHE_DTYPES[t.feature_cache_dtype])
        free = [f for f in distributed.all_gather_objects(free_device_bytes(self.device)) if f is not None]
        plan = plan_store(self.cfg.data.device_store, self.device, need["total"], min(free) if free else None,
                          self.cfg.data.num_workers)  # the least free memory of any rank: every rank places alike
        where = f"{self.device} memory" if plan.on_device else (
            "host memory, pinned non-blocking copies" if self.device.type == "cuda" else "host memory, DataLoader")
        log.info("data store: %s (frames %.2f GiB uint8 + feature cache %.2f GiB %s): %s", where,
                 need["frames"] / 2**30, need["features"] / 2**30, t.feature_cache_dtype if t.feature_cache else "off",
                 plan.reason)
        return plan

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> dict:
        """uint8 frames -> model images on the device, + cached features when enabled. With the device store
        the batch is there already (the copies are no-ops) and only the resize / scaling runs."""
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

    def total_steps(self) -> int:
        return self.cfg.training.max_steps or self.cfg.training.epochs * len(self.train_loader)

    def train_step(self, batch: dict, decode_prediction: bool) -> dict:
        """One optimiser step on this rank's shard of a global batch (dinowm/step.py): the model's outputs,
        grad_norm and finite (false: a non-finite loss or gradient on some rank skipped the update on
        every rank), all on the device; nothing is read to the host."""
        t = self.cfg.training
        return self.train_step_fn(self._inputs(batch), self.step, decode_prediction, decoder_frames=t.decoder_frames,
                                  train_decoder=self.step % t.decoder_every_steps == 0)

    def inspect(self) -> dict:
        """`train.py --inspect`: one real training batch through the model with stage hooks (printed)."""
        from dinowm.stages import inspect_forward

        batch = next(iter(self.train_loader))
        print(f"{type(self.model).__name__} on one training batch ({batch['obs'].shape[0]} samples):")
        with self._autocast():
            return inspect_forward(self.model, self._inputs(batch))

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        steps_per_epoch = len(self.train_loader)
        total_steps = self.total_steps()  # max_steps wins, past `epochs` if need be
        # the FLOPs are counted on the first step of a run (uncompiled: FlopCounterMode); a resumed run keeps
        # the count, so its next step runs the compiled path as it would have without the interruption
        timer = StepTimer(self.device, flops_per_sample=self.flops_per_sample, devices=self.dist.world_size)
        gpu = GpuMonitor.for_device(self.device)
        last = {}
        bar = tqdm(total=total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.logging.progress_bar and self.dist.main), dynamic_ncols=True)
        log_file = self.run_dir / ("train.log" if self.dist.main else f"train.rank{self.dist.rank}.log")
        with maybe_profile(cfg.profiling, self.run_dir) as profiler, StopOnSignal() as stop, \
                HangWatchdog(t.hang_timeout_s, log_file, self.dist.rank) as self.watchdog:
            while self.step < total_steps:
                timer.start_epoch()
                self.train_loader.batch_sampler.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
                for batch in self.train_loader:
                    timer.data_ready()
                    log_step = (self.step + 1) % cfg.logging.every_steps == 0
                    out = timer.run_step(lambda: self.train_step(batch, log_step), batch["obs"].shape[0])
                    self.flops_per_sample = timer.flops_per_sample
                    self.step += 1
                    self.batch_in_epoch += 1
                    timer.step_done(batch["obs"].shape[0] * self.dist.world_size)  # samples of the global batch
                    self.watchdog.beat()
                    if profiler is not None:
                        profiler.step()
                    self.stats.add(out)  # device sums; NaN never enters the logged means
                    bar.update(1)
                    if log_step or self.step == total_steps:
                        window = self._check_nonfinite(new_window=True)  # the one host read of the window
                        # every rank's loss is the mean over an equal share: their mean is the global batch's
                        last = distributed.mean_over_ranks(window["means"])
                        last.update(timer.summary())
                        gpu_values = gpu.read()
                        last.update(gpu_values)
                        last["epoch"] = self.epoch + self.batch_in_epoch / steps_per_epoch
                        last["nonfinite_skips"] = window["skips"]
                        self.sink.write(self.step, "train", last)
                        if "loss" in last:
                            bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{last['samples_per_s']:.1f}",
                                            **({"gpu": gpu.postfix(gpu_values)} if gpu_values else {}))
                    # validation, rollouts, images and checkpoints are not step or data-wait time
                    if self.batch_in_epoch == steps_per_epoch:  # before a Ctrl-C save: never save "end of epoch, not done"
                        with timer.excluded():
                            self._end_of_epoch(batch, out)
                    if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self._validated_at != self.step:
                        with timer.excluded():
                            self.validate(images=False)
                    if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 \
                            and self._saved_at != self.step:  # (an epoch end saved this step already)
                        with timer.excluded():
                            self.save(keep_as=f"step{self.step}" if cfg.checkpoint.keep_epochs else None)
                    if distributed.any_rank(stop.requested):  # all ranks stop after the same step
                        bar.close()
                        path = self.save()
                        self.sink.close()
                        log.warning("stopped at step %d by a signal; checkpoint saved to %s; continue with: "
                                    "python train.py --resume %s", self.step, path, self.run_dir)
                        raise SystemExit(stop.exit_code)
                    if self.step >= total_steps:
                        break
        bar.close()
        if self._validated_at != self.step:  # e.g. stopped mid-epoch by max_steps: validate, keep the position
            last.update(self.validate(images=False))
        self.save()
        self.sink.close()
        return last

    def _check_nonfinite(self, new_window: bool = False) -> dict:
        """Read the step statistics (StepStats.read); warn about updates skipped since the last check, and
        stop without saving once training.max_nonfinite_steps were skipped in a row. Checked at every
        logging step and before every validation and checkpoint, so no checkpoint follows such a run."""
        stats = self.stats.read(new_window)
        new = stats["skips"] - self._skips_reported
        if not new:
            return stats
        self._skips_reported = stats["skips"]
        what = stats["nonfinite"]
        if self.dist.enabled:  # every rank skipped the same steps; the culprits are per rank
            what = sorted({f"{name} (rank {r})" for r, names in enumerate(distributed.all_gather_objects(what))
                           for name in names})
        limit = self.cfg.training.max_nonfinite_steps
        log.warning("step %d: non-finite %s; %d update(s) skipped since the last check (%d in a row now; the run "
                    "stops at %d)", self.step, ", ".join(what), new, stats["run"], limit)
        if stats["longest"] >= limit:
            self.sink.close()
            latest = self.run_dir / "checkpoints" / "model_latest.pt"
            kept = f"the last good checkpoint {latest} is intact" if latest.exists() else "no checkpoint was written"
            raise NonFiniteError(f"step {self.step}: {stats['longest']} consecutive steps with non-finite values "
                                 f"(training.max_nonfinite_steps = {limit}), last: {', '.join(what)}; stopped without "
                                 f"saving ({kept}). Lower the learning rates (optim.*) or check the data, then resume "
                                 f"with: python train.py --resume {self.run_dir} --optim.predictor_lr ...")
        return stats

    def _end_of_epoch(self, batch: dict, out: dict) -> None:
        cfg = self.cfg
        self.epoch += 1
        self.batch_in_epoch = 0
        epoch = self.epoch
        images = epoch % cfg.logging.image_every_epochs == 0
        if images and self.dist.main:
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
        """Loss sums over this rank's shard of the validation batches, added up over ranks; rollouts,
        images and the record on rank 0 (the returned dict is complete there)."""
        self._check_nonfinite()
        self.model.eval()
        self._validated_at = self.step
        sums, count, first = defaultdict(float), 0, None
        # batches of the per-rank training size (the memory a rank has shown to have), dealt round robin
        n_pred, bs = self.cfg.data.num_pred, max(1, self.cfg.training.batch_size // self.dist.world_size)
        for i, start in enumerate(range(0, len(self.val_indices), bs)):
            if i % self.dist.world_size != self.dist.rank:
                continue
            batch = self.data.val.batch(self.val_indices[start:start + bs])
            inputs = self._inputs(batch)
            if "visual" not in inputs:
                inputs["visual"] = self.model.encode_visual(inputs["obs"])
            with self._autocast():
                out = self.model(**inputs, decode_prediction=True)
            if "z_visual_loss" in out:  # DINO-WM's MSE on the features (the AC family reports its copy_last_loss)
                visual = inputs["visual"].float()
                out["copy_last_z_visual_loss"] = F.mse_loss(visual[:, :-n_pred], visual[:, n_pred:])  # f as f + num_pred
            n = batch["obs"].shape[0]
            for k, v in out.items():
                if k.endswith("loss"):
                    sums[k] += float(v.detach()) * n
            count += n
            first = first or (batch, out)
            self.watchdog.beat()
        if self.dist.enabled:  # a rank may have had no batch at all: gather, not a fixed-size all-reduce
            gathered = distributed.all_gather_objects((dict(sums), count))
            sums, count = defaultdict(float), 0
            for rank_sums, rank_count in gathered:
                for k, v in rank_sums.items():
                    sums[k] += v
                count += rank_count
        results = {f"val_{k}": v / max(count, 1) for k, v in sums.items()}
        if count and "val_z_visual_loss" in results:  # DINO-WM (AC: val_z_tf_loss vs val_copy_last_loss)
            results["val_z_visual_ratio_to_copy_last"] = (results["val_z_visual_loss"]
                                                          / max(results["val_copy_last_z_visual_loss"], 1e-12))
        if not self.dist.main:
            return results
        if "val_copy_last_loss" in results:  # the AC objective: is one step better than repeating the frame?
            log.info("validation one-step latent L1: model %.4f, copy-last-frame baseline %.4f",
                     results["val_z_tf_loss"], results["val_copy_last_loss"])
        results.update(self.rollout_metrics(images=images))
        self.sink.write(self.step, "val", results)
        if images and first is not None:
            self._save_grid(*first, self.run_dir / "valid" / f"valid_e{self.epoch:05d}.png")
        log.info("epoch %d step %d: %s", self.epoch, self.step,
                 ", ".join(f"{k} {v:.4f}" for k, v in results.items() if not k.startswith("rollout_h")))
        return results

    def _rollout_windows(self) -> FrameWindows | None:
        """Windows of num_hist + rollout_horizon frames of the validation episodes (None: too short / none)."""
        cfg = self.cfg
        episodes = self.data.val_ids[: cfg.eval.rollout_episodes or None]
        if not episodes or cfg.eval.rollout_horizon < 1:
            return None
        with warnings.catch_warnings():  # episodes too short for this horizon are simply not rolled out
            warnings.simplefilter("ignore")
            windows = FrameWindows(self.data.dataset, episodes, num_frames=self.model.context_frames + cfg.eval.rollout_horizon,
                                   frameskip=cfg.data.frameskip, stats=self.data.stats,
                                   proprio_slice=self.data.proprio_slice, allow_empty=True)
        if len(windows) == 0:
            log.warning("validation episodes are too short for a rollout of %d steps; no rollout metrics",
                        cfg.eval.rollout_horizon)
            return None
        return windows

    @torch.no_grad()
    def rollout_metrics(self, images: bool = True) -> dict:
        """Open-loop rollouts (docs/contract.md §8) from eval.rollout_samples start points across the validation episodes.

        Per horizon h, for the model and the copy-last-frame baseline: latent MSE of the visual and proprio
        channels, PSNR and SSIM of decoded frames (see dinowm.eval.horizon_errors).
        """
        if self.rollout_windows is None:
            return {}
        num_hist, horizon = self.model.context_frames, self.cfg.eval.rollout_horizon
        self.model.eval()
        averages, shown = HorizonAverages(), None
        for start in range(0, len(self.rollout_indices), self.cfg.training.batch_size):
            batch = self.rollout_windows.batch(self.rollout_indices[start:start + self.cfg.training.batch_size])
            inputs = self._inputs(batch)
            with self._autocast():
                errors = horizon_errors(self.model, inputs["obs"], inputs["proprio"], inputs["action"],
                                        visual=inputs.get("visual"))
            averages.add(errors)
            if shown is None and "decoded" in errors:  # a model without a decoder has no images
                shown = (inputs["obs"][0], errors["decoded"][0], errors["copy_last_decoded"][0])
        means = averages.means()
        results = {}
        for name, prefix in (("model", "rollout"), ("copy_last", "rollout_copy_last")):
            for key, values in means[name].items():
                key = {"z_visual_mse": "z_visual_err", "z_proprio_mse": "z_proprio_err"}.get(key, key)
                for h, v in enumerate(values):
                    results[f"{prefix.replace('rollout', f'rollout_h{h + 1}')}_{key}"] = v
                results[f"{prefix}_{key}"] = sum(values) / horizon
        for h in range(1, horizon + 1):
            results[f"rollout_h{h}_ratio_to_copy_last"] = (results[f"rollout_h{h}_z_visual_err"]
                                                           / max(results[f"rollout_h{h}_copy_last_z_visual_err"], 1e-12))
        if images and shown is not None:
            obs, decoded, copy_last = shown  # copy-last decoded: what its PSNR / SSIM are of
            blank = torch.ones_like(obs[:num_hist])
            save_grid([obs, torch.cat([blank, decoded.float()]), torch.cat([blank, copy_last.float()])],
                      self.run_dir / "rollout" / f"rollout_e{self.epoch:05d}.png",
                      ["ground truth", "rollout", "copy-last (decoded)"], _frame_labels(num_hist, horizon),
                      title=f"open-loop rollout, epoch {self.epoch} step {self.step}")
        return results

    # ------------------------------------------------------------------------------------------
    # images and checkpoints
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _save_grid(self, batch: dict, out: dict, path: Path) -> None:
        """Rows: ground truth | reconstruction | prediction (target frames) of the first sample."""
        truth = preprocess_images(batch["obs"][0], self.cfg.data.img_size)  # (T, 3, S, S)
        rows, labels = [truth], ["ground truth"]
        if "recon" in out:  # models without a decoder have no images but the ground truth
            rows.append(out["recon"][0].float())
            labels.append("reconstruction")
        if "pred_image" in out:
            pred = out["pred_image"][0].float()
            pad = truth.shape[0] - pred.shape[0]  # predictions start at frame num_pred
            rows.append(torch.cat([torch.ones_like(truth[:pad]), pred]) if pad > 0 else pred)
            labels.append("prediction")
        fs = self.cfg.data.frameskip
        save_grid(rows, path, labels, [f"frame {k} (t+{k * fs})" for k in range(truth.shape[0])],
                  title=f"{path.parent.name}: epoch {self.epoch} step {self.step}")

    def state(self, rng: list, skips: dict) -> dict:
        """rng: capture_rng_state() of every rank; skips: StepStats.read() (updates skipped so far, and in a row)."""
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
            "batch_in_epoch": self.batch_in_epoch,  # global batches: the same position for any world size
            "rng": rng[0],
            "rank_rng": rng[1:],  # ranks > 0 draw their own dropout masks
            "world_size": self.dist.world_size,
            "nonfinite_skips": skips["skips"],
            "nonfinite_run": skips["run"],  # skipped in a row when saved: the limit counts on after a resume
            "flops_per_sample": self.flops_per_sample,
            "validated_at": self._validated_at,
            "fingerprints": self.fingerprints,
            "schedule": self.schedule.to_dict(),
            "data_widths": self.data_widths,
        }

    def save(self, keep_as: int | None = None) -> Path:
        """Collective under torchrun (every rank's RNG state is gathered); rank 0 writes."""
        skips = self._check_nonfinite()
        folder = self.run_dir / "checkpoints"
        path = folder / "model_latest.pt"
        rng = distributed.all_gather_objects(capture_rng_state(self.model))
        self._saved_at = self.step  # on every rank: it decides whether the next (collective) save is called
        if not self.dist.main:
            return path
        state = self.state(rng, skips)
        atomic_save(state, path)
        if keep_as is not None:
            atomic_save(state, folder / f"model_{keep_as}.pt")
            self._prune_checkpoints(folder)
        return path

    def _prune_checkpoints(self, folder: Path) -> None:
        """Keep the newest checkpoint.keep_last numbered copies (model_<epoch>.pt, model_step<N>.pt; ordered by
        the training step their names say, not by file times, which copies reset); model_latest.pt and any
        other file stay."""
        keep = self.cfg.checkpoint.keep_last
        names = {p: NUMBERED_CHECKPOINT.fullmatch(p.name) for p in folder.glob("model_*.pt")}
        numbered = sorted((p for p, m in names.items() if m), key=lambda p: (
            int(names[p]["step"]) if names[p]["step"] else int(names[p]["epoch"]) * len(self.train_loader)))
        for p in numbered[:-keep] if keep else []:
            p.unlink(missing_ok=True)

    def _load_model_weights(self, weights: dict, init: bool = False) -> None:
        """Load model weights; the frozen encoder's may be absent (it comes from model.encoder_weights), and
        when starting a run (init) from weights without any decoder (an imported predictor), the decoder's."""
        source = "the --init-from weights" if init else f"the --resume checkpoint of {self.run_dir}"
        try:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise CheckpointError(f"{source}: its weights do not fit the configured model (check model.* and "
                                  f"data.* settings): {str(e).splitlines()[-1].strip()}") from None
        optional = ("encoder.",)
        if init and not any(k.startswith("decoder.") for k in weights):
            optional += ("decoder.",)
            if any(k.startswith("decoder.") for k in missing):
                log.info("init: the weights hold no decoder; the decoder starts from its initialisation")
        missing = [k for k in missing if not k.startswith(optional)]
        if missing or unexpected:
            raise CheckpointError(f"{source}: its weights do not match the configured model: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]} (check model.* and data.* settings)")

    # hyperparameters a resumed run may override (--optim.*): load_state_dict would restore the saved ones
    OVERRIDABLE = ("weight_decay",)  # (learning rates are set every step from the configured base rates)

    def _load_state(self, ckpt: dict) -> None:
        self._load_model_weights(ckpt["model"])
        for name, opt in self.optimizers.items():
            configured = [{k: g[k] for k in self.OVERRIDABLE if k in g} for g in opt.param_groups]
            opt.load_state_dict(ckpt["optimizers"][name])
            for group in opt.param_groups:  # the implementation configured now (fused), not the saved one's
                group.update({k: opt.defaults[k] for k in ("foreach", "fused", "capturable")})
            for state in opt.state.values():  # fused kernels keep the step count on the parameter's device
                state["step"] = state["step"].to(self.device, torch.float32)
            for group, values in zip(opt.param_groups, configured):
                for key, value in values.items():
                    if group[key] != value:
                        log.info("resume: %s optimiser %s %g -> %g (configured now)", name, key, group[key], value)
                        group[key] = value
        saved_optim = ckpt.get("config", {}).get("optim", {})
        for key, value in vars(self.cfg.optim).items():
            if key.endswith("_lr") and saved_optim.get(key, value) != value:
                log.info("resume: optim.%s %g -> %g (configured now)", key, saved_optim[key], value)
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        if "schedule" in ckpt:  # the curve the run started on (older checkpoints: constant, from the config)
            saved = Schedule(**ckpt["schedule"])
            if not saved.same_curve(Schedule.from_config(self.cfg.optim, saved.total_steps)):
                raise ConfigError(f"--resume: the checkpoint's learning-rate schedule {saved.to_dict()} differs "
                                  f"from optim.schedule/warmup_steps/min_lr_ratio/decay_fraction of the config; "
                                  f"resume with the same values, or start a new run with --init-from")
            self.schedule = saved
        log.info("resumed at step %d (epoch %d, batch %d)", self.step, self.epoch, self.batch_in_epoch)

    def _check_fingerprints(self, ckpt: dict, what: str) -> None:
        if "fingerprints" not in ckpt:
            if what == "dataset":  # warn once
                log.warning("resume: the checkpoint records no dataset/encoder fingerprints (written by an older "
                            "version); cannot check that data.path and model.encoder_weights are the same as before")
            return
        try:
            fingerprint.check(what, ckpt["fingerprints"], self.fingerprints, self.cfg.data.path,
                              self.cfg.model.encoder_weights)
        except ValueError as e:
            raise CheckpointError(str(e)) from None

    def _restore_rng(self, ckpt: dict | None) -> None:
        """Every rank continues its own random stream; a rank the checkpoint has no stream for (another
        world size, or a fresh run) starts a stream of its own from (seed, rank, step)."""
        rank = self.dist.rank
        if ckpt:
            streams = [ckpt["rng"]] + list(ckpt.get("rank_rng", []))
            same_world = ckpt.get("world_size", 1) == self.dist.world_size
            if not same_world and rank == 0 and self.cfg.model.predictor_dropout > 0:
                log.warning("resume with %d processes instead of %d: dropout masks are drawn per rank, so the "
                            "continuation is not bit-identical to an uninterrupted run", self.dist.world_size,
                            ckpt.get("world_size", 1))
            if rank == 0 or same_world:
                restore_rng_state(streams[rank], self.model)
                return
        if rank > 0:
            torch.manual_seed(self.cfg.training.seed + 1_000_003 * rank + self.step)
            dropout.reseed(self.model, self.cfg.training.seed + 1_000_003 * rank + self.step)


def _frame_labels(num_hist: int, horizon: int) -> list[str]:
    """Column labels of a rollout grid: context frames t-k .. t, then h = 1..horizon."""
    return [f"t-{num_hist - 1 - j}" if j < num_hist - 1 else "t" for j in range(num_hist)] + \
        [f"h={h}" for h in range(1, horizon + 1)]
