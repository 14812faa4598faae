"""The parity rule of KERNELS.md (from flash-attention's tests), in one assert helper.

Low precision: compare the fast output and a same-dtype PyTorch output against one high-precision
reference computed from the same inputs,

    max|out_fast - ref| <= factor * max|out_torch - ref| + floor

(factor 2 for outputs, 3 for gradients). fp32/fp64 paths without a same-dtype PyTorch output: the
relative error ||out_fast - ref|| / ||ref|| must stay under `floor` (default 1e-4 for fp32).
On failure the message names the worst index and both values there.
"""
from __future__ import annotations

import torch

_DEFAULT_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _worst(err: torch.Tensor) -> tuple[int, ...]:
    flat = int(torch.nan_to_num(err, nan=float("inf")).flatten().argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))


def assert_parity(
    out_fast: torch.Tensor,
    out_ref: torch.Tensor,
    out_torch: torch.Tensor | None = None,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "",
) -> None:
    """Assert the parity rule; `out_ref` should be fp64 or fp32 computed from the same inputs.

    out_fast: the output under test, any dtype; out_torch: the same op in plain PyTorch at the
    fast path's dtype (None for fp32/fp64 paths: then a relative-error check with `floor`).
    """
    label = f"{name}: " if name else ""
    assert out_fast.shape == out_ref.shape, f"{label}shape {tuple(out_fast.shape)} != {tuple(out_ref.shape)}"
    fast = out_fast.detach().double().cpu()
    ref = out_ref.detach().double().cpu()
    if floor is None:
        floor = _DEFAULT_FLOOR.get(out_fast.dtype, 1e-4)
    assert torch.isfinite(ref).all(), f"{label}reference has non-finite values"
    err = (fast - ref).abs()
    idx = _worst(err)
    where = f"worst at {idx}: fast={fast[idx].item():.6g} ref={ref[idx].item():.6g}"
    assert torch.isfinite(fast).all(), f"{label}{int((~torch.isfinite(fast)).sum())} non-finite values; {where}"
    if out_torch is None:
        rel = (err.norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel <= floor, f"{label}relative error {rel:.3g} > {floor:.3g}; {where}"
        return
    torch_err = (out_torch.detach().double().cpu() - ref).abs().max().item()
    bound = factor * torch_err + floor
    assert err.max().item() <= bound, (
        f"{label}max error {err.max().item():.4g} > {factor} * {torch_err:.4g} + {floor:.3g} = {bound:.4g}; {where}"
    )
