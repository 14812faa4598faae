"""`train.py --inspect`: the forward of one real batch as its flow of stages, with shapes and statistics.

Forward hooks only (nothing in the models or the training step branches on it): every module whose
forward runs prints one line, in execution order, with its output's shape, min, max, mean and std;
the inputs of the world model's top-level parts (encoder, predictor, decoder, embeddings) are printed
as they enter. Containers, activations and dropout are skipped. Values a fused kernel never
materialises as a module output are shown through `nn.Identity` taps in the models (e.g. the AC
predictor's `embed_tap`: the tokens after LayerNorm -> predictor_embed). Works for either family.
"""
from __future__ import annotations

import torch
import torch.nn as nn

SKIPPED = (nn.ModuleList, nn.ModuleDict, nn.Dropout, nn.GELU, nn.ReLU)


def describe(x: torch.Tensor) -> str:
    xf = x.detach().float()
    return (f"{str(list(x.shape)):<22} {str(x.dtype).removeprefix('torch.'):<9} min {xf.min():10.4f}  "
            f"max {xf.max():10.4f}  mean {xf.mean():10.4f}  std {xf.std() if xf.numel() > 1 else 0.0:10.4f}")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield "", value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            for name, t in _tensors(v):
                yield f"[{i}]{name}", t


def inspect_forward(model: nn.Module, inputs: dict, print_fn=print) -> dict:
    """Run model(**inputs) once with hooks printing every stage; returns the model's output."""
    handles = []

    def on_input(name):
        def hook(module, args, kwargs):
            for key, value in list(enumerate(args)) + list(kwargs.items()):
                for sub, t in _tensors(value):
                    print_fn(f"{name + ' <- in ' + str(key) + sub:<48} {describe(t)}")
        return hook

    def on_output(name):
        def hook(module, args, output):
            for sub, t in _tensors(output):
                print_fn(f"{name + sub:<48} {describe(t)}")
        return hook

    for name, module in model.named_modules():
        if not name or isinstance(module, SKIPPED):
            continue
        if "." not in name:
            handles.append(module.register_forward_pre_hook(on_input(name), with_kwargs=True))
        handles.append(module.register_forward_hook(on_output(name)))
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    for key, value in out.items():
        if key.endswith("loss"):
            print_fn(f"{key:<48} {float(value):.6f}")
    return out
