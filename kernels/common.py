"""Small helpers shared by the kernel modules and the dispatcher (imports no triton at module level)."""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: Triton kernels run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous (what the kernels' pointer arithmetic assumes), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.cache
def tl_dtypes() -> dict:
    """torch dtype -> triton.language dtype, for the dtypes the kernels accept."""
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}


def dot_dtype(dtype: torch.dtype):
    """The triton dtype GEMM operands are rounded to for `dtype` inputs."""
    if dtype == torch.bfloat16 and interpreting():
        import triton.language as tl

        return tl.float32  # interpreter bf16 arithmetic is broken (triton issue 11584)
    return tl_dtypes()[dtype]
