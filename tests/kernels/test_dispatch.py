"""The dispatcher: which backend each call resolves to, why, and what it refuses.

    python -m pytest tests/kernels/test_dispatch.py -x -q
"""
from __future__ import annotations

import logging
import types

import pytest
import torch

from kernels import dispatch, reference


def small_inputs(requires_grad=False, head_dim=24):
    frame_ids = reference.frame_ids_for(3, 6)
    q, k, v = (torch.randn(1, 2, 18, head_dim, requires_grad=requires_grad) for _ in range(3))
    return q, k, v, frame_ids


def test_auto_on_cpu_picks_frame_prefix_sdpa():
    q, *_ = small_inputs()
    choice = dispatch.resolve_attention("auto", q)
    assert choice.backend == "sdpa" and "fastest measured CPU path" in choice.reason


def test_auto_on_cuda(monkeypatch):
    q = types.SimpleNamespace(device=torch.device("cuda"), shape=(1, 1, 4, 24), dtype=torch.bfloat16)  # a stand-in
    monkeypatch.setattr(dispatch, "_attention_blocker", lambda *a: None)
    assert dispatch.resolve_attention("auto", q).backend == "triton"
    monkeypatch.setattr(dispatch, "_attention_blocker", lambda *a: "triton not importable (test)")
    choice = dispatch.resolve_attention("auto", q)
    assert choice.backend == "sdpa" and "triton unavailable" in choice.reason


def test_triton_runs_under_interpreter_and_is_refused_without(monkeypatch):
    q, *_ = small_inputs()
    assert dispatch.resolve_attention("triton", q).backend == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendUnavailable, match="needs CUDA tensors"):
        dispatch.resolve_attention("triton", q)
    with pytest.raises(dispatch.BackendUnavailable, match="needs CUDA tensors"):
        dispatch.layernorm_linear(torch.randn(2, 8), None, None, torch.randn(4, 8), None, backend="triton")


def test_triton_refuses_large_head_dim():
    q, *_ = small_inputs(head_dim=128)
    with pytest.raises(dispatch.BackendUnavailable, match="head dim 128"):
        dispatch.resolve_attention("triton", q)


def test_triton_on_cuda_runs_compile_checked_head_dims_only():
    """On CUDA a head dim the compile check did not cover (a different HEAD_DIM constexpr) is refused, so
    `auto` takes SDPA; the interpreter (CPU tests) runs any head dim up to 64."""
    for head_dim in (16, 24, 32, 48, 64):
        on_cuda = dispatch._attention_blocker("triton", "cuda", head_dim, 0.0, True, "bfloat16")
        assert (on_cuda is None) == (head_dim in (24, 32, 64)), head_dim
        assert dispatch._attention_blocker("triton", "cpu", head_dim, 0.0, True, "float32") is None


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_flash_and_xformers_refused(backend):
    q, k, v, frame_ids = small_inputs()
    with pytest.raises(dispatch.BackendUnavailable, match=backend if backend == "flash" else "xformers"):
        dispatch.block_causal_attention(q, k, v, frame_ids, backend=backend)


def test_flex_refusals():
    q, k, v, frame_ids = small_inputs(requires_grad=True)
    with pytest.raises(dispatch.BackendUnavailable, match="forward only"):
        dispatch.block_causal_attention(q, k, v, frame_ids, backend="flex")
    with pytest.raises(dispatch.BackendUnavailable, match="dropout"):
        dispatch.resolve_attention("flex", q.detach(), dropout_p=0.1)
    # no grad needed under no_grad
    assert dispatch.resolve_attention("flex", q.detach(), needs_grad=False).backend == "flex"


def test_unknown_backend():
    q, k, v, frame_ids = small_inputs()
    with pytest.raises(ValueError, match="unknown"):
        dispatch.block_causal_attention(q, k, v, frame_ids, backend="cudnn")
    with pytest.raises(ValueError, match="unknown"):
        dispatch.resolve_simple("tiled_embedding", "kernels.embedding", "sdpa", torch.device("cpu"))


def test_choice_logged_once(caplog):
    q, *_ = small_inputs()
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="kernels"):
        for _ in range(3):
            dispatch.resolve_attention("reference", q)
            dispatch.resolve_attention("auto", q)
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert len(lines) == 2, lines
    assert any("backend=reference" in line for line in lines)
    assert any("backend=sdpa (requested auto)" in line for line in lines)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])  # auto is sdpa on CPU; reference is the oracle
def test_attention_backends_agree(backend):
    q, k, v, frame_ids = small_inputs()
    tables = reference.rope_tables(torch.randint(0, 8, (18, 3)), 24)
    out = dispatch.block_causal_attention(q, k, v, frame_ids, tables, scale=0.3, backend=backend)
    ref = reference.block_causal_attention_ref(q.double(), k.double(), v.double(), frame_ids, tables, scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_simple_ops_auto_is_reference_on_cpu():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    choice = dispatch.resolve_simple("layernorm_linear", "kernels.ln_linear", "auto", x.device)
    assert choice.backend == "reference"
    assert dispatch.resolve_simple("tiled_embedding", "kernels.embedding", "auto", x.device).backend == "reference"


def test_simple_ops_triton_missing_module_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "_importable",
                        lambda module: f"{module} not importable (test)" if module.startswith("kernels.") else None)
    with pytest.raises(dispatch.BackendUnavailable, match="kernels.embedding not importable"):
        dispatch.resolve_simple("tiled_embedding", "kernels.embedding", "triton", torch.device("cpu"))


def test_simple_ops_triton_under_interpreter():
    pytest.importorskip("kernels.ln_linear")
    pytest.importorskip("kernels.embedding")
    x, w, g, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(16), torch.randn(16)
    out = dispatch.layernorm_linear(x, g, b, w, None, backend="triton")
    ref = reference.layernorm_linear_ref(x.double(), g.double(), b.double(), w.double(), None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    visual, proprio, action = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5), torch.randn(1, 2, 6)
    args = (visual, proprio, action, torch.randn(7, 5), torch.randn(7), torch.randn(7, 6), torch.randn(7))
    ref = reference.tiled_embedding_ref(*(a.double() for a in args))
    torch.testing.assert_close(dispatch.tiled_embedding(*args, backend="triton").double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_sdpa_computes_in_fp32_under_bf16_autocast(dtype):
    """What the docstring promises: autocast must not recast the fp32 upcast to bf16 inside SDPA."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SdpaDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    q, k, v, frame_ids = (t.to(dtype) if t.is_floating_point() else t for t in small_inputs(requires_grad=False))
    with torch.autocast("cpu", dtype=torch.bfloat16), SdpaDtypes() as mode:
        out = dispatch.frame_prefix_attention(q, k, v, frame_ids)
    assert mode.seen and set(mode.seen) == {torch.float32}
    assert out.dtype == dtype
    ref = reference.block_causal_attention_ref(q.double(), k.double(), v.double(), frame_ids)
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=2**-7, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# fp32 on CUDA: a compile-checked Triton configuration or SDPA, never an unchecked variant
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_sends_fp32_cuda_attention_to_sdpa_and_says_why(dtype):
    choice = dispatch._resolve_attention("auto", "cuda", 64, 0.1, True, dtype)  # the pure decision: no GPU needed
    assert choice.backend == "sdpa"
    assert f"{dtype} inputs" in choice.reason and "kernels.compile_check" in choice.reason
    with pytest.raises(dispatch.BackendUnavailable, match="compile-checked"):
        dispatch._resolve_attention("triton", "cuda", 64, 0.0, False, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_auto_keeps_triton_for_the_checked_cuda_dtypes(dtype):
    pytest.importorskip("triton")
    choice = dispatch._resolve_attention("auto", "cuda", 24, 0.1, True, dtype)
    assert choice.backend == "triton" and "compile-checked" in choice.reason


def test_checked_dtypes_are_what_compile_check_compiles():
    pytest.importorskip("triton")
    from kernels import attention, compile_specs

    signatures = {spec["signature"]["Q"] for spec in compile_specs.attention_specs() if spec["name"] == "attn_fwd"}
    names = {torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    assert signatures == {names[d] for d in attention.CHECKED_DTYPES}


def test_the_launcher_refuses_fp32_outside_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from kernels import attention

    q, k, v, frame_ids = small_inputs()
    monkeypatch.setattr(attention, "interpreting", lambda: False)
    with pytest.raises(TypeError, match="compile-checked for fp16/bf16 only"):
        attention.attention_fwd(q, k, v, frame_ids)


def test_model_token_layout_follows_the_attention_dtype():
    x = torch.randn(2, 3)
    assert dispatch.attention_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.attention_dtype(x) == torch.bfloat16
