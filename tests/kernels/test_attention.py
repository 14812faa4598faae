"""RoPE + frame-block-causal attention: the Triton kernels (interpreted on CPU) and the PyTorch paths
against `block_causal_attention_ref` in fp64, under the parity rule of KERNELS.md.

    python -m pytest tests/kernels/test_attention.py -x -q
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels import attention, compile_specs, dispatch, reference
from kernels.attention import AttentionConfig

from _parity import assert_parity

SMALL = AttentionConfig(fwd=(16, 32, 4, 3), dkdv=(32, 16, 4, 2), dq=(16, 32, 4, 2))  # many tiles, few tokens
TINY = AttentionConfig(fwd=(16, 16, 4, 3), dkdv=(16, 16, 4, 2), dq=(16, 16, 4, 2))


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def make_case(batch, heads, frames, tokens_per_frame, head_dim, dtype, rope=None, permute=False, cond_tokens=0):
    """Fresh random q, k, v, dO, frame ids and RoPE tables (None, "rope" or "legacy")."""
    if cond_tokens:
        side = math.isqrt(tokens_per_frame - cond_tokens)
        positions, frame_ids = reference.ac_token_positions(frames, side, side, cond_tokens)
    else:
        frame_ids = reference.frame_ids_for(frames, tokens_per_frame)
        positions = torch.randint(0, 16, (frame_ids.numel(), 3))
    n = frame_ids.numel()
    if permute:
        perm = torch.randperm(n)
        frame_ids, positions = frame_ids[perm], positions[perm]
    tables = None if rope is None else reference.rope_tables(positions, head_dim, legacy=(rope == "legacy"))
    q, k, v, do = (torch.randn(batch, heads, n, head_dim, dtype=dtype) for _ in range(4))
    return q, k, v, do, frame_ids, tables


def reference_grads(fn, q, k, v, do, dtype=None):
    """(out, dq, dk, dv) of fn(q, k, v) at `dtype` (default: the inputs' own)."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return (out.detach(), *grads)


def check_all(fast, ref64, lowp=None, name=""):
    """Parity of (out, dq, dk, dv): factor 2 for the output, 3 for gradients."""
    for i, label in enumerate(("out", "dq", "dk", "dv")):
        assert_parity(fast[i], ref64[i], None if lowp is None else lowp[i], factor=2.0 if i == 0 else 3.0,
                      name=f"{name} {label}")


def run_triton_poisoned(q, k, v, do, frame_ids, tables, config=None, seed=None, dropout_p=0.0, scale=None):
    """Forward and backward launchers with every output buffer filled with NaN first."""
    cos, sin = tables if tables is not None else (None, None)
    b, h, n, d = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, h, n), float("nan"), dtype=acc)
    attention.attention_fwd(q, k, v, frame_ids, cos, sin, seed, scale, dropout_p, config, out=out, lse=lse)
    grads = [torch.full_like(q, float("nan")) for _ in range(3)]
    attention.attention_bwd(do, q, k, v, out, lse, frame_ids, cos, sin, seed, scale, dropout_p, config, *grads)
    return out, lse, *grads


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
CASES = [
    # batch, heads, frames, tokens/frame, head_dim, dtype, rope, permute, cond_tokens, config
    pytest.param(1, 2, 3, 37, 24, torch.float32, None, False, 0, None, id="d24-fp32-3x37"),
    pytest.param(2, 1, 3, 37, 64, torch.float32, "rope", False, 0, None, id="d64-fp32-rope-b2"),
    pytest.param(1, 1, 7, 40, 64, torch.float16, None, False, 0, None, id="d64-fp16-7x40"),
    pytest.param(1, 2, 4, 18, 24, torch.float16, "rope", False, 2, SMALL, id="d24-fp16-ac-rope"),
    pytest.param(1, 2, 4, 18, 24, torch.float32, "legacy", False, 2, SMALL, id="d24-fp32-ac-legacy"),
    pytest.param(1, 1, 5, 13, 32, torch.float16, "legacy", False, 0, SMALL, id="d32-fp16-legacy"),
    pytest.param(1, 2, 5, 13, 32, torch.float32, "rope", True, 0, SMALL, id="d32-fp32-permuted"),
    pytest.param(2, 1, 3, 20, 64, torch.float16, "rope", True, 0, TINY, id="d64-fp16-permuted-b2"),
    pytest.param(1, 1, 1, 5, 24, torch.float32, None, False, 0, None, id="single-frame-5"),
    pytest.param(1, 1, 3, 1, 24, torch.float32, "rope", False, 0, TINY, id="one-token-frames"),
]


@pytest.mark.parametrize("batch,heads,frames,tpf,head_dim,dtype,rope,permute,cond,config", CASES)
def test_triton_matches_reference(batch, heads, frames, tpf, head_dim, dtype, rope, permute, cond, config):
    q, k, v, do, frame_ids, tables = make_case(batch, heads, frames, tpf, head_dim, dtype, rope, permute, cond)
    out, lse, dq, dk, dv = run_triton_poisoned(q, k, v, do, frame_ids, tables, config)

    def ref(q_, k_, v_):
        return reference.block_causal_attention_ref(q_, k_, v_, frame_ids, tables)

    ref64 = reference_grads(ref, q, k, v, do, torch.float64)
    lowp = None
    if dtype != torch.float32:  # same-dtype PyTorch: SDPA with the dense mask
        lowp = reference_grads(lambda *x: dispatch.sdpa_dense_attention(*x, frame_ids, tables), q, k, v, do)
    check_all((out, dq, dk, dv), ref64, lowp, name="triton")
    # LSE (base 2) of the rotated, scaled scores
    q64, k64 = q.double(), k.double()
    if tables is not None:
        q64, k64 = reference.apply_rope_ref(q64, *tables), reference.apply_rope_ref(k64, *tables)
    scores = (q64 @ k64.transpose(-1, -2)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~reference.block_causal_mask(frame_ids), float("-inf"))
    # the LSE is fp32 for every input dtype: compared with the fp64 value directly (no same-dtype baseline)
    assert_parity(lse, torch.logsumexp(scores, -1) / math.log(2), None,
                  floor=1e-4 if dtype == torch.float32 else 2e-2, name="lse")


def test_block_maps_classify_tiles():
    # 3 frames of 37 tokens, 16 x 32 tiles: check every pair against the dense mask
    frame_ids = reference.frame_ids_for(3, 37)
    kv_count, kv_idx, q_count, q_idx = attention.block_maps(frame_ids, 16, 32)
    allowed = reference.block_causal_mask(frame_ids)
    n = frame_ids.numel()
    for m in range(kv_count.shape[0]):
        n_full, n_part = kv_count[m].tolist()
        visited = kv_idx[m, : n_full + n_part].tolist()
        rows = allowed[m * 16:(m + 1) * 16]
        for j in range(kv_idx.shape[1]):
            tile = rows[:, j * 32:(j + 1) * 32]
            if j not in visited:
                assert not tile.any()
            elif j in kv_idx[m, :n_full].tolist():
                assert tile.all() and tile.shape == (16, 32) and (m + 1) * 16 <= n
    # the transposed lists visit the same pairs
    pairs = {(m, j) for m in range(kv_count.shape[0]) for j in kv_idx[m, : kv_count[m].sum()].tolist()}
    pairs_t = {(m, j) for j in range(q_count.shape[0]) for m in q_idx[j, : q_count[j].sum()].tolist()}
    assert pairs == pairs_t


def test_permuted_layout_has_fewer_partial_tiles():
    # KERNELS.md: 7 frames x 258 tokens, 128 x 128 tiles: 41 partial tiles -> 29 with the patch-first layout
    _, frame_ids = reference.ac_token_positions(7, 16, 16)
    order = reference.cond_last_order(7, 258)
    assert sorted(order.tolist()) == list(range(7 * 258))
    partial = [attention.block_maps(f, 128, 128)[0][:, 1].sum().item() for f in (frame_ids, frame_ids[order])]
    assert partial[1] < partial[0]


def test_cond_last_order_roundtrip():
    q, k, v, do, frame_ids, tables = make_case(1, 1, 3, 11, 24, torch.float32, "rope", cond_tokens=2)
    order = reference.cond_last_order(3, 11)
    inverse = torch.argsort(order)
    direct = attention.block_causal_attention_triton(q, k, v, frame_ids, tables, config=SMALL)
    permuted = attention.block_causal_attention_triton(
        q[:, :, order], k[:, :, order], v[:, :, order], frame_ids[order],
        (tables[0][order], tables[1][order]), config=SMALL)
    torch.testing.assert_close(permuted[:, :, inverse], direct, rtol=1e-5, atol=1e-5)
    assert torch.equal(q[:, :, order][:, :, inverse], q)


def test_triton_gradcheck_fp64():
    q, k, v, _, frame_ids, tables = make_case(1, 1, 3, 4, 24, torch.float64, "legacy")
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def fn(q_, k_, v_):
        return attention.block_causal_attention_triton(q_, k_, v_, frame_ids, tables, config=TINY)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_triton_gradcheck_fp64_dropout():
    q, k, v, _, frame_ids, tables = make_case(1, 1, 2, 9, 24, torch.float64, "rope")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    seed = torch.tensor([1234], dtype=torch.int64)
    blocks = TINY.blocks()

    def fn(q_, k_, v_):
        return attention._attention_op(q_, k_, v_, frame_ids, *tables, seed, [], 0.3, 0.25, blocks)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_dropout_mask_statistics():
    seed = torch.tensor([7], dtype=torch.int64)
    keep = attention.dropout_keep_mask(seed, 1, 2, 200, 0.1)  # (1, 2, 200, 200)
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - 0.1) < 0.005, rate  # 80,000 draws: std 0.001
    assert not torch.equal(keep[0, 0], keep[0, 1]), "heads must draw different masks"
    assert torch.equal(keep, attention.dropout_keep_mask(seed, 1, 2, 200, 0.1)), "must be reproducible"
    other = attention.dropout_keep_mask(seed + 1, 1, 2, 200, 0.1)
    assert (other != keep).float().mean() > 0.1


@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "shipped"])
def test_dropout_matches_reproduced_mask(config):
    p = 0.1
    q, k, v, do, frame_ids, tables = make_case(2, 1, 3, 21, 64, torch.float32, None)
    seed = torch.tensor([99], dtype=torch.int64)
    out, lse, dq, dk, dv = run_triton_poisoned(q, k, v, do, frame_ids, tables, config, seed=seed, dropout_p=p)
    keep = attention.dropout_keep_mask(seed, 2, 1, q.shape[2], p)

    def ref(q_, k_, v_):
        return reference.block_causal_attention_ref(q_, k_, v_, frame_ids, tables, dropout_p=p, dropout_keep=keep)

    check_all((out, dq, dk, dv), reference_grads(ref, q, k, v, do, torch.float64), name="dropout")


def test_public_op_autograd_and_dispatch():
    q, k, v, do, frame_ids, tables = make_case(1, 2, 3, 30, 24, torch.float16, "rope")
    fast = reference_grads(
        lambda *x: dispatch.block_causal_attention(*x, frame_ids, tables, backend="triton"), q, k, v, do)
    ref64 = reference_grads(lambda *x: reference.block_causal_attention_ref(*x, frame_ids, tables), q, k, v, do,
                            torch.float64)
    lowp = reference_grads(lambda *x: dispatch.sdpa_dense_attention(*x, frame_ids, tables), q, k, v, do)
    check_all(fast, ref64, lowp, name="custom op")


def test_public_op_dropout_statistics():
    # E[dropout(P) V] = P V: averaging many draws converges to the dropout-free output
    q, k, v, _, frame_ids, _ = make_case(1, 1, 2, 16, 24, torch.float32)
    exact = attention.block_causal_attention_triton(q, k, v, frame_ids, config=TINY)
    draws = torch.stack([attention.block_causal_attention_triton(q, k, v, frame_ids, dropout_p=0.5, config=TINY)
                         for _ in range(64)])
    assert not torch.equal(draws[0], draws[1]), "each call must draw a new seed"
    err = (draws.mean(0) - exact).abs().mean() / exact.abs().mean()
    assert err < 0.15, err


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [24, 64])
def test_triton_bf16_gpu(head_dim):
    q, k, v, do, frame_ids, tables = make_case(2, 4, 7, 258, head_dim, torch.bfloat16, "rope", cond_tokens=2)
    q, k, v, do, frame_ids = (x.cuda() for x in (q, k, v, do, frame_ids))
    tables = tuple(t.cuda() for t in tables)
    out, lse, dq, dk, dv = run_triton_poisoned(q, k, v, do, frame_ids, tables)
    ref64 = reference_grads(lambda *x: reference.block_causal_attention_ref(*x, frame_ids, tables), q, k, v, do,
                            torch.float64)
    lowp = reference_grads(lambda *x: dispatch.sdpa_dense_attention(*x, frame_ids, tables), q, k, v, do)
    check_all((out, dq, dk, dv), ref64, lowp, name="bf16 gpu")


# ----------------------------------------------------------------------------------------------
# torch.compile through the custom op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    q, k, v, do, frame_ids, tables = make_case(1, 1, 2, 16, 24, torch.float32, "rope")

    def step(q_, k_, v_):
        out = attention.block_causal_attention_triton(q_ * 1.0, k_, v_, frame_ids, tables, config=TINY)
        return out * 2.0

    compiled = torch.compile(step, backend=compile_backend, fullgraph=True)
    fast = reference_grads(compiled, q, k, v, do)
    ref64 = reference_grads(lambda *x: reference.block_causal_attention_ref(x[0] * 1.0, *x[1:], frame_ids, tables) * 2.0,
                            q, k, v, do, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref64):
        assert_parity(a, b, name=name)


# ----------------------------------------------------------------------------------------------
# PyTorch paths: per-frame prefix SDPA (the CPU fast path) and Flex
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("permute", [False, True], ids=["frame-major", "permuted"])
def test_frame_prefix_matches_reference(dtype, permute):
    q, k, v, do, frame_ids, tables = make_case(2, 3, 5, 18, 24, dtype, "rope", permute, cond_tokens=2)
    fast = reference_grads(lambda *x: dispatch.frame_prefix_attention(*x, frame_ids, tables), q, k, v, do)
    ref64 = reference_grads(lambda *x: reference.block_causal_attention_ref(*x, frame_ids, tables), q, k, v, do,
                            torch.float64)
    lowp = None
    if dtype != torch.float32:
        lowp = reference_grads(lambda *x: dispatch.sdpa_dense_attention(*x, frame_ids, tables), q, k, v, do)
    check_all(fast, ref64, lowp, name="frame prefix")


def test_frame_prefix_dropout_runs():
    q, k, v, _, frame_ids, _ = make_case(1, 2, 3, 10, 24, torch.float32)
    a = dispatch.frame_prefix_attention(q, k, v, frame_ids, dropout_p=0.1)
    b = dispatch.frame_prefix_attention(q, k, v, frame_ids)
    assert a.shape == b.shape and torch.isfinite(a).all() and not torch.equal(a, b)


def test_flex_forward_matches_reference():
    q, k, v, _, frame_ids, tables = make_case(1, 2, 3, 43, 32, torch.float32, "rope")
    with torch.no_grad():
        out = dispatch.block_causal_attention(q, k, v, frame_ids, tables, backend="flex")
    ref = reference.block_causal_attention_ref(q.double(), k.double(), v.double(), frame_ids, tables)
    assert_parity(out, ref, name="flex")


def test_flex_refuses_grad_on_cpu():
    q, k, v, _, frame_ids, _ = make_case(1, 1, 2, 8, 24, torch.float32)
    with pytest.raises(dispatch.BackendUnavailable, match="forward only"):
        dispatch.block_causal_attention(q.requires_grad_(), k, v, frame_ids, backend="flex")


# ----------------------------------------------------------------------------------------------
# compile specs (compiled for sm_80/sm_90 by `python -m kernels.compile_check`)
# ----------------------------------------------------------------------------------------------
def test_compile_specs_are_complete():
    specs = compile_specs.attention_specs()
    names = {spec["name"] for spec in specs}
    assert names == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "rope"}
    configs = {spec["config"] for spec in specs if spec["name"] == "attn_fwd"}
    # head dims x dtypes x rope x dropout
    assert len(configs) == len(attention.HEAD_DIMS) * len(attention.CHECKED_DTYPES) * 2 * 2
    for spec in specs:
        assert set(spec["signature"]) == set(spec["fn"].arg_names), spec["name"]
        constexprs = {arg for arg, kind in spec["signature"].items() if kind == "constexpr"}
        assert constexprs == set(spec["constexprs"]), spec["name"]


# ----------------------------------------------------------------------------------------------
# the memory claim: the fused kernel keeps O(N * D) activations for backward, the dense path O(N^2)
# ----------------------------------------------------------------------------------------------
def saved_bytes(fn, q, k, v) -> int:
    """Bytes of the tensors autograd saves for backward while running fn(q, k, v) (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    return sum(storages.values())


def test_saved_activations_grow_linearly_not_quadratically():
    sizes = {}
    for frames in (2, 8):
        q, k, v, _, frame_ids, _ = make_case(1, 2, frames, 16, 24, torch.float32)
        sizes[frames] = {
            "triton": saved_bytes(lambda *x: attention.block_causal_attention_triton(*x, frame_ids, config=TINY), q, k, v),
            "dense": saved_bytes(lambda *x: reference.block_causal_attention_ref(*x, frame_ids), q, k, v),
        }
    assert sizes[8]["triton"] <= 4.2 * sizes[2]["triton"], sizes  # 4x the tokens: 4x the memory
    assert sizes[8]["dense"] >= 8.0 * sizes[2]["dense"], sizes  # the (N, N) scores dominate
    assert sizes[8]["triton"] < sizes[8]["dense"] / 2, sizes
