"""The training step, read top to bottom, and the device-side bookkeeping around it.

    zero the gradients (set to None)
    out = model(**inputs)                              under autocast (bf16) or in fp32
    out["loss"].backward()
    grad_norm = ||all trained gradients||_2            one device reduction (under DDP: of the averaged gradients)
    finite = isfinite(loss) & isfinite(grad_norm)      under torchrun agreed by a device all-reduce (MAX)
    gradients *= min(1, grad_clip / grad_norm)         training.grad_clip > 0 (0: off, as the original)
    every optimiser steps, fused AdamW / Adam         with found_inf = !finite: a non-finite step changes
                                                       no weight, moment or step count (the mechanism
                                                       torch.amp.GradScaler uses)

Nothing in it reads a value to the host: the learning rates are device tensors written before the step
(`set_learning_rates`, a fill per optimiser), the skip is decided inside the fused optimiser kernels,
and the outputs (losses, grad_norm, finite) stay on the device. `StepStats` sums them there; the loop
reads it once per logging step and before every validation and checkpoint.

Variants of the same step (`TrainStep(..., compile=..., cuda_graphs=...)`):

    eager        training.compile = false
    compiled     training.compile = true: the forward (and with it AOTAutograd's backward) and the
                 gradient part (norm, guard, clip) are two torch.compile(fullgraph=True) regions. The
                 optimiser step is the fused multi-tensor kernel: torch.optim marks fused optimisers
                 torch.compiler.disable, it is already the compiled form of the update.
    CUDA graphs  training.cuda_graphs = true (eager or compiled): the step without the decoded prediction
                 is captured once into a torch.cuda.graph with static input buffers and replayed; logging
                 steps (decode_prediction) run uncaptured. Dropout stays random: torch's
                 generator advances its Philox offset per replay and the Triton attention's seed is device
                 state the forward advances in place (kernels/dropout.py).
"""
from __future__ import annotations

import logging

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from dinowm import distributed

log = logging.getLogger("dinowm")


def build_optimizers(model, cfg) -> dict[str, torch.optim.Optimizer]:
    """docs/contract.md §9: AdamW for the predictor and the embeddings, Adam for the decoder; the encoder is frozen.
    A model without embeddings (the AC predictor holds its own) or without a decoder gets no optimiser for them.

    Fused kernels on CUDA and on CPU: one multi-tensor kernel per optimiser, and the only torch.optim
    implementation that takes `found_inf` (the sync-free skip of a non-finite step). On CPU it is also
    far faster than foreach, whose CPU ops loop over tensors (bench/bench_optimizer.py). On CUDA also
    capturable (step() may be captured into a CUDA graph: training.cuda_graphs)."""
    groups = model.parameter_groups()
    kernel = {"fused": True, "capturable": next(model.parameters()).is_cuda}  # groups may be param-group dicts (AC)
    optimizers = {"predictor": torch.optim.AdamW(groups["predictor"], lr=cfg.predictor_lr,
                                                 weight_decay=cfg.predictor_weight_decay, **kernel)}
    if "embeddings" in groups:
        optimizers["embeddings"] = torch.optim.AdamW(groups["embeddings"], lr=cfg.embedding_lr,
                                                     weight_decay=cfg.embedding_weight_decay, **kernel)
    if "decoder" in groups:
        optimizers["decoder"] = torch.optim.Adam(groups["decoder"], lr=cfg.decoder_lr, **kernel)
    return optimizers


class TrainStep:
    """One optimiser step on this rank's shard of a global batch: `train_step(inputs, step_index,
    decode_prediction, **options)` (calling the instance; options: further model keywords, e.g.
    train_decoder) returns the model's outputs plus `grad_norm` (before clipping) and `finite` (0-dim bool:
    the update was applied), all device tensors.

    model: the module to train (the DDP wrapper under torchrun); optimizers: from build_optimizers;
    schedule: lr = (the optimiser's configured lr) * schedule.factor(step_index); dtype: autocast dtype;
    backend: the torch.compile backend (the tests use aot_eager: the same graphs without code generation)."""

    def __init__(self, model, optimizers: dict, schedule, device: torch.device,
                 dtype: torch.dtype = torch.float32, grad_clip: float = 0.0, compile: bool = False,
                 cuda_graphs: bool = False, backend: str = "inductor"):
        self.model, self.optimizers, self.schedule = model, optimizers, schedule
        self.base_lrs = {name: opt.defaults["lr"] for name, opt in optimizers.items()}  # as configured
        self.device, self.dtype, self.grad_clip = device, dtype, grad_clip
        self.params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
        self.found_inf = torch.zeros((), device=device)  # 1.0: the fused kernels skip this step
        for opt in optimizers.values():
            opt.found_inf = self.found_inf
            # learning rates as device tensors, written in place before each step: a compiled step sees no
            # changing Python float (no recompilation), a captured one reads them where they are
            for group in opt.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.graph = None
        self.forward, self.gradients = self._forward, self._gradients
        if compile:
            self.forward = torch.compile(self._forward, fullgraph=True, backend=backend)
            self.gradients = torch.compile(self._gradients, fullgraph=True, backend=backend)
        if cuda_graphs:
            self.graph = CapturedStep(self)

    def set_learning_rates(self, step_index: int) -> None:
        factor = self.schedule.factor(step_index)
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"].fill_(self.base_lrs[name] * factor)

    def __call__(self, inputs: dict, step_index: int, decode_prediction: bool = False, **options) -> dict:
        self.set_learning_rates(step_index)
        if is_in_torch_dispatch_mode(include_infra_modes=False):  # e.g. StepTimer's FlopCounterMode over the
            return self.step(inputs, decode_prediction, options, compiled=False)  # first step: compiled code can't
        if self.graph is not None and not decode_prediction:
            return self.graph(inputs, options)
        out = self.step(inputs, decode_prediction, options)
        if self.graph is not None and self.graph.graphs:  # replays use the graphs' own gradient buffers:
            for opt in self.optimizers.values():  # free this uncaptured step's instead of keeping a second set
                opt.zero_grad(set_to_none=True)
        return out

    def step(self, inputs: dict, decode_prediction: bool, options: dict, compiled: bool = True) -> dict:
        forward, gradients = (self.forward, self.gradients) if compiled else (self._forward, self._gradients)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.model.train()
        out = forward(inputs, decode_prediction, options)
        out["loss"].backward()
        out["grad_norm"], out["finite"] = gradients(out["loss"].detach())
        for opt in self.optimizers.values():
            opt.step()
        return out

    def _forward(self, inputs: dict, decode_prediction: bool, options: dict) -> dict:
        # a capture must not keep autocast's cache of cast weights (it would hold the capture's casts)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=self.graph is None):
            return self.model(**inputs, decode_prediction=decode_prediction, **options)

    def _gradients(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global gradient norm, the finite flag (agreed over ranks), the clip, found_inf for the optimisers."""
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        self.found_inf.copy_((~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float())
        distributed.all_reduce_max(self.found_inf)  # a NaN on any rank skips the step on every rank
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, grad_norm)  # no-op: grad=None
        return grad_norm, self.found_inf == 0


class CapturedStep:
    """`TrainStep.step(inputs, decode_prediction=False, options)` captured into CUDA graphs and replayed: one
    graph per set of options (e.g. train_decoder with training.decoder_every_steps > 1), each in its own
    memory pool.

    The first calls of a set run the step on a side stream (warm-up: compilation, optimiser state, cuBLAS
    workspaces), the next one captures it with the inputs copied into static buffers; every later call
    copies its inputs there and replays. Outputs are the graph's static tensors, overwritten by the next
    replay (the loop consumes them at once: StepStats.add)."""

    WARMUP = 3

    def __init__(self, train_step: TrainStep):
        self.train_step = train_step
        self.calls: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}  # options -> graph, inputs, outputs

    def __call__(self, inputs: dict, options: dict) -> dict:
        step, key = self.train_step, tuple(sorted(options.items()))
        if key in self.graphs:
            graph, static_inputs, static_out = self.graphs[key]
            for k, v in inputs.items():
                static_inputs[k].copy_(v, non_blocking=True)
            graph.replay()
            return static_out
        self.calls[key] = self.calls.get(key, 0) + 1
        stream = torch.cuda.current_stream(step.device)
        if self.calls[key] <= self.WARMUP:
            side = torch.cuda.Stream(step.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                out = step.step(inputs, False, options)
            stream.wait_stream(side)
            return out
        static_inputs = {k: v.clone() for k, v in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        for opt in step.optimizers.values():  # gradients are allocated inside the capture (its pool)
            opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_out = step.step(static_inputs, False, options)
        self.graphs[key] = graph, static_inputs, static_out
        log.info("training step %s captured into a CUDA graph (replayed from now on; logging steps run "
                 "uncaptured)", dict(options))
        graph.replay()  # the capture itself ran nothing: this is the step
        return static_out


class StepStats:
    """Device-side sums of the training steps' outputs since the last logging step, and the skip counters.

    add(out): device ops only: every finite `*loss` entry and grad_norm of a step whose update was applied
    (out["finite"]) is summed, each key over the steps that have it (decoder_pred_loss exists only on
    logging steps); a skipped step adds to the skip counters and records which entries were non-finite.
    read(): one host transfer of everything."""

    def __init__(self, device: torch.device, skips: int = 0, run: int = 0):
        self.device = device
        self._windows: dict[tuple[str, ...], torch.Tensor] = {}  # keys -> (3, K) fp64: sum, count, non-finite
        # skips in total, skips in a row now, longest run of skips since the last read (a resumed run
        # continues the run it was saved in)
        self._skips = torch.tensor([skips, run, run], dtype=torch.int64, device=device)

    def add(self, out: dict) -> None:
        keys = tuple(k for k in out if k.endswith("loss") or k == "grad_norm")
        values = torch.stack([out[k].detach().float() for k in keys]).to(self.device, torch.float64)  # (K,)
        finite = out["finite"] if "finite" in out else torch.ones((), dtype=torch.bool, device=self.device)
        if keys not in self._windows:
            self._windows[keys] = torch.zeros(3, len(keys), dtype=torch.float64, device=self.device)
        window = self._windows[keys]
        value_finite = torch.isfinite(values)
        counted = finite & value_finite  # a non-finite side value (no gradient) of an applied step too
        window[0] += torch.where(counted, values, 0.0)
        window[1] += counted
        window[2] += ~value_finite
        skipped = (~finite).long()
        run = (self._skips[1] + 1) * skipped
        self._skips += torch.stack([skipped, run - self._skips[1], (run - self._skips[2]).clamp_min(0)])

    def read(self, new_window: bool = True) -> dict:
        """{"means": {key: mean over the window}, "nonfinite": [keys non-finite in the window, "gradients"
        for grad_norm], "skips": total, "run": skips in a row now, "longest": longest run in the window};
        new_window: then start a new window (logging steps; the checks before validation and checkpoints
        only look)."""
        groups = list(self._windows.items())
        flat = torch.cat([self._skips.double()] + [w.flatten() for _, w in groups]).tolist()
        skips, run, longest = (int(v) for v in flat[:3])
        sums, counts, bad, pos = {}, {}, set(), 3
        for keys, _ in groups:
            k = len(keys)
            for i, key in enumerate(keys):
                sums[key] = sums.get(key, 0.0) + flat[pos + i]
                counts[key] = counts.get(key, 0.0) + flat[pos + k + i]
                if flat[pos + 2 * k + i]:
                    bad.add("gradients" if key == "grad_norm" else key)
            pos += 3 * k
        if new_window:
            for w in self._windows.values():
                w.zero_()
            self._skips[2] = self._skips[1]
        return {"means": {k: sums[k] / counts[k] for k in sums if counts[k]}, "nonfinite": sorted(bad),
                "skips": skips, "run": run, "longest": longest}
