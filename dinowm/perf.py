"""Machine-dependent speed settings that do not change what is computed (beyond TF32 on CUDA, an option).

`configure(model, device, dtype, tf32, activation_checkpointing)` is called once when a model is set up for training:

- CUDA: cudnn.benchmark (the decoder's convolutions have fixed shapes: the fastest algorithm is picked once);
  TF32 for fp32 matmuls and convolutions unless training.tf32 = false.
- The decoder's convolutions run on channels_last activations and weights (measured faster on CPU,
  bench/bench_decoder.py; on CUDA cuDNN's NHWC kernels are the tensor-core path), and, under bf16
  autocast on a CPU without bf16 instructions (AVX-512 BF16 or AMX), in fp32, because there bf16
  convolutions are emulated. Logged with the reason.

`SavedTensors` measures what these choices (and activation checkpointing) cost in activation memory
(bench/bench_memory.py).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("dinowm")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX): oneDNN's bf16 kernels then
    run natively."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def decoder_fp32_convs(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """-> (fp32_convs, why): whether the decoder's convolutions leave bf16 autocast on this machine."""
    if device.type == "cpu" and dtype != torch.float32 and not cpu_has_bf16():
        return True, "CPU without bf16 instructions: bf16 convolutions would be emulated, so they run in fp32"
    if device.type == "cuda":
        return False, "CUDA: cuDNN's NHWC convolutions (tensor cores under bf16)"
    return False, f"CPU {'fp32' if dtype == torch.float32 else 'bf16 with AVX-512 BF16 / AMX'}: oneDNN's NHWC convolutions"


def configure(model, device: torch.device, dtype: torch.dtype, tf32: bool = True,
              activation_checkpointing: bool = False) -> None:
    """activation_checkpointing: recompute the predictor blocks in the backward pass (both families)."""
    predictor = model.predictor
    (getattr(predictor, "transformer", predictor)).activation_checkpointing = activation_checkpointing
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        log.info("CUDA: cudnn.benchmark on; TF32 for fp32 matmuls/convolutions %s (training.tf32)",
                 "allowed" if tf32 else "off")
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return
    # channels_last: measured faster on CPU (bench/bench_decoder.py), cuDNN's tensor-core layout on CUDA;
    # the weights too: otherwise every call reorders them (and their casts)
    decoder.channels_last = True
    decoder.to(memory_format=torch.channels_last)
    decoder.fp32_convs, why = decoder_fp32_convs(device, dtype)
    log.info("decoder: channels_last activations%s (%s)", ", fp32 convolutions" if decoder.fp32_convs else "", why)


class SavedTensors:
    """Counts the bytes autograd keeps for the backward pass (the activation memory of a step), inside
    `with SavedTensors(exclude=..., scopes={"decoder": model.decoder}) as saved: loss = model(...)`.

    Every tensor saved for backward passes through the pack hook; a storage is counted once however many
    views of it are saved. Storages of `exclude` (parameters, the step's inputs: memory the step holds anyway)
    are not counted. `by_scope` splits the bytes by the innermost module of `scopes` running when a tensor
    was saved ("other" outside them). Works on fake tensors (torch._subclasses.FakeTensorMode), so a large
    batch can be measured without the memory it describes.
    """

    def __init__(self, exclude=(), scopes: dict | None = None):
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._scopes = scopes or {}
        self._seen: dict[int, tuple[str, int]] = {}
        self._stack = ["other"]
        self._keep = []  # the saved tensors, alive until the end: a freed storage's address may be reused
        self._handles = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = (self._stack[-1], storage.nbytes())
            self._keep.append(t)
        return t

    def _pop(self) -> None:  # a forward hook's return value would replace the module's output
        self._stack.pop()

    @property
    def total(self) -> int:
        return sum(n for _, n in self._seen.values())

    @property
    def by_scope(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, n in self._seen.values():
            out[name] = out.get(name, 0) + n
        return out

    def __enter__(self) -> "SavedTensors":
        for name, module in self._scopes.items():
            self._handles.append(module.register_forward_pre_hook(lambda *_, n=name: self._stack.append(n)))
            self._handles.append(module.register_forward_hook(lambda *_: self._pop()))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._keep.clear()
