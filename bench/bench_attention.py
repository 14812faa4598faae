"""Frame-block-causal attention: fast paths against the baselines of KERNELS.md.

    BENCH_THREADS=1 pytest bench/bench_attention.py --benchmark-only --benchmark-group-by=group,param
    pytest bench/bench_attention.py --benchmark-disable -q        # each benchmark once, small shapes

Shapes (docs/contract.md §5, §11): `dinowm` = B x 3 frames x 256 patch tokens, 16 heads x 64, no RoPE;
`ac` = B x 7 frames x (2 + 256) tokens, 16 heads x 24, 3-axis RoPE. B = 32 / 1 on CUDA, 4 / 1 on
CPU; under --benchmark-disable B = 1 and 2 heads.

Providers: `triton` (CUDA only), `frame_prefix` (per-frame prefix SDPA: the `sdpa` backend and the
CPU fast path), `sdpa_dense` (SDPA with the dense boolean mask), `flex` (compiled FlexAttention with
a BlockMask; forward only on CPU), `flash_attn` (flash-attn called once per frame against its key
prefix; CUDA, fp16/bf16) and `xformers` (memory-efficient attention with the mask as a bias tensor;
CUDA) where those packages are installed (imported lazily, skipped otherwise), `reference`. RoPE is
a separate pass in every provider but triton.

extra_info: shape, dtype, device, achieved GFLOP/s (attention FLOPs = 4 b h d x allowed score
entries, backward 2.5x the forward) and `speedup_vs_<baseline>` = t_baseline / t_provider for every
other provider (baselines timed once per session with the same inputs).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kernels import dispatch, reference
from kernels.frames import CHECKED_DTYPES

SHAPES = {
    # name: (frames, tokens/frame, cond tokens, heads, head dim, rope, batch on CUDA, batch on CPU)
    "dinowm": (3, 256, 0, 16, 64, False, 32, 4),
    "ac": (7, 258, 2, 16, 24, True, 1, 1),
}
PROVIDERS = ("triton", "frame_prefix", "sdpa_dense", "flex", "flash_attn", "xformers", "reference")
OPTIONAL_PACKAGES = {"flash_attn": "flash_attn", "xformers": "xformers"}  # imported lazily, skipped where absent


def flash_attn_per_frame(q, k, v, frame_ids, rope=None, scale=None):
    """flash-attn, called once per frame: frame f's queries against the keys of frames <= f (no mask).
    (B, H, N, D) in, (B, H, N, D) out; flash-attn's (B, N, H, D) layout is a transposed view."""
    from flash_attn import flash_attn_func

    if rope is not None:
        q, k = reference.apply_rope_ref(q, *rope), reference.apply_rope_ref(k, *rope)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    counts = torch.unique_consecutive(frame_ids, return_counts=True)[1].tolist()
    outs, end = [], 0
    for count in counts:
        start, end = end, end + count
        outs.append(flash_attn_func(q[:, start:end], k[:, :end], v[:, :end], softmax_scale=scale))
    return torch.cat(outs, dim=1).transpose(1, 2)


def xformers_bias(q, k, v, frame_ids, rope=None, scale=None):
    """xformers memory-efficient attention with the frame mask as an additive bias tensor (0 / -inf),
    its last dim padded to a multiple of 8 as xformers requires."""
    from xformers.ops import memory_efficient_attention

    if rope is not None:
        q, k = reference.apply_rope_ref(q, *rope), reference.apply_rope_ref(k, *rope)
    n = frame_ids.numel()
    padded = -(-n // 8) * 8
    bias = torch.zeros(q.shape[0], q.shape[1], n, padded, device=q.device, dtype=q.dtype)
    bias[..., :n].masked_fill_(~reference.block_causal_mask(frame_ids.to(q.device)), float("-inf"))
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, N, H, D)
    return memory_efficient_attention(q, k, v, attn_bias=bias[..., :n], scale=scale).transpose(1, 2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _provider_fn(provider):
    if provider == "triton":
        from kernels.attention import block_causal_attention_triton

        return block_causal_attention_triton
    return {"frame_prefix": dispatch.frame_prefix_attention, "sdpa_dense": dispatch.sdpa_dense_attention,
            "flex": dispatch.flex_block_causal_attention, "flash_attn": flash_attn_per_frame,
            "xformers": xformers_bias,
            "reference": reference.block_causal_attention_ref}[provider]


def _unsupported(provider, mode, device, dtype=None):
    if provider in OPTIONAL_PACKAGES:
        if device.type != "cuda":
            return f"{provider} runs on CUDA only"
        if importlib.util.find_spec(OPTIONAL_PACKAGES[provider]) is None:
            return f"{OPTIONAL_PACKAGES[provider]} is not installed"
        if provider == "flash_attn" and dtype == torch.float32:
            return "flash-attn supports fp16/bf16 only"
    if provider == "triton" and device.type != "cuda":
        return "triton is timed on CUDA only (the interpreter is not a benchmark)"
    if provider == "triton" and dtype is not None and dtype not in CHECKED_DTYPES:
        return "no compile-checked fp32 Triton configuration (fp32 attention on CUDA runs SDPA)"
    if provider == "flex" and mode == "fwd_bwd" and device.type == "cpu":
        return "FlexAttention on CPU is forward only in torch 2.13"
    return None


def _inputs(shape, dtype, device, small):
    frames, tpf, cond, heads, head_dim, rope, batch_cuda, batch_cpu = SHAPES[shape]
    batch = 1 if small else (batch_cuda if device.type == "cuda" else batch_cpu)
    heads = 2 if small else heads
    if cond:
        side = int((tpf - cond) ** 0.5)
        positions, frame_ids = reference.ac_token_positions(frames, side, side, cond, device=device)
    else:
        frame_ids = reference.frame_ids_for(frames, tpf, device=device)
    tables = reference.rope_tables(positions, head_dim) if rope else None
    n = frame_ids.numel()
    q, k, v, do = (torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype) for _ in range(4))
    flops = 4 * batch * heads * head_dim * int(reference.block_causal_mask(frame_ids).sum())
    return q, k, v, do, frame_ids, tables, flops


def _runner(provider, mode, q, k, v, do, frame_ids, tables):
    fn = _provider_fn(provider)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, frame_ids, tables)
        return run
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def run():
        out = fn(*leaves, frame_ids, tables)
        torch.autograd.grad(out, leaves, do)
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(benchmark, bench_utils, timing_cache, device, shape, dtype_name, mode, provider):
    reason = _unsupported(provider, mode, device, DTYPES[dtype_name])
    if reason:
        pytest.skip(reason)
    small = bench_utils.is_disabled(benchmark)
    torch.manual_seed(0)
    q, k, v, do, frame_ids, tables, flops = _inputs(shape, DTYPES[dtype_name], device, small)
    run = _runner(provider, mode, q, k, v, do, frame_ids, tables)
    benchmark.group = f"attention-{shape}-{dtype_name}-{mode}"

    def timed():
        run()
        bench_utils.synchronize(device)

    rounds = 5 if device.type == "cpu" else 20
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1 if small else 2, iterations=1)
    if small:
        return
    total_flops = flops * (3.5 if mode == "fwd_bwd" else 1.0)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        shape=f"{tuple(q.shape)} frames={int(frame_ids.max()) + 1}", dtype=dtype_name, mode=mode,
        provider=provider, device=bench_utils.device_name(device), gflops=round(total_flops / seconds / 1e9, 2),
    )
    key = (shape, dtype_name, mode)
    timing_cache[(*key, provider)] = seconds
    for baseline in PROVIDERS:
        if baseline == provider or _unsupported(baseline, mode, device, DTYPES[dtype_name]):
            continue
        if (*key, baseline) not in timing_cache:
            timing_cache[(*key, baseline)] = bench_utils.best_time(
                _runner(baseline, mode, q, k, v, do, frame_ids, tables), device, rounds=3)
        benchmark.extra_info[f"speedup_vs_{baseline}"] = round(timing_cache[(*key, baseline)] / seconds, 3)
