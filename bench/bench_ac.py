"""The V-JEPA 2-AC predictor: one training step, ours vs the official style, and KV-cache rollouts.

Seed shapes (docs/contract.md §11): B 4, clips of T 7 frames, 16x16 = 256 patches, D_enc 1024, A = S = 2,
24 blocks, d 384, 16 heads; the loss is teacher forcing + the 2-step rollout term, no decoder.

    pytest bench/bench_ac.py --benchmark-only --benchmark-group-by=group,param   # seed shapes (CPU: slow,
                                                                                  # 2 rounds each)
    pytest bench/bench_ac.py --benchmark-disable -q                              # tiny shapes, once (CI)

train_step[...]: "official" computes what the official code computes per call: the dense (N, N) boolean
frame mask rebuilt and SDPA run over it, RoPE angles recomputed in fp32 in every layer and applied as a
separate pass, LayerNorm and Linear unfused; "ours" is the model with `auto` backends (per-frame prefix
SDPA on CPU; fused RoPE, skipped tiles and the cond-last layout with Triton on CUDA; cached layouts).
Both run on the same weights and inputs, in fp32 and under bf16 autocast; their losses must agree
(asserted), and extra_info records the speed-up of ours over official at the same dtype.

rollout[...]: an open-loop rollout of 6 steps from 1 context frame (to 7 frames), with the KV cache
against recomputing every frame at each step; outputs must agree; extra_info records the speed-up.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinowm.models.ac_predictor import COND_TOKENS, INPUT_LN_EPS, ACPredictor
from dinowm.models.ac_world_model import ACWorldModel
from dinowm.models.encoder import DinoV2Encoder
from kernels.reference import ac_token_positions, apply_rope_ref, block_causal_mask, rope_tables

SHAPES = {
    "seed": dict(batch=4, frames=7, grid=16, visual_dim=1024, dim=384, depth=24, heads=16, action=2, state=2),
    "tiny": dict(batch=2, frames=4, grid=2, visual_dim=64, dim=48, depth=2, heads=2, action=2, state=2),
}
_seconds: dict = {}


class OfficialStylePredictor(nn.Module):
    """The official forward's per-call work, on an ACPredictor's weights (the benchmark baseline)."""

    def __init__(self, predictor: ACPredictor):
        super().__init__()
        self.p = predictor
        self.depth = predictor.depth

    def forward(self, x, actions, states, cache=None):
        p = self.p
        b, t, n_patch, _ = x.shape
        tokens = F.linear(F.layer_norm(x, (x.shape[-1],), eps=INPUT_LN_EPS), p.predictor_embed.weight,
                          p.predictor_embed.bias)
        seq = torch.cat([p.action_encoder(actions)[:, :, None].to(tokens.dtype),
                         p.state_encoder(states)[:, :, None].to(tokens.dtype), tokens], dim=2).flatten(1, 2)
        n = seq.shape[1]
        positions, frame_ids = ac_token_positions(t, *p.grid, COND_TOKENS)
        mask = block_causal_mask(frame_ids).to(x.device)  # rebuilt and copied every call
        for block in p.predictor_blocks:
            h = block.norm1(seq)
            qkv = block.attn.qkv(h).view(b, n, 3, p.heads, -1).permute(2, 0, 3, 1, 4)
            cos, sin = rope_tables(positions.to(x.device), p.head_dim, legacy=p.rope_legacy)  # every layer, fp32
            q, k = apply_rope_ref(qkv[0].float(), cos, sin), apply_rope_ref(qkv[1].float(), cos, sin)
            q, k = q.to(qkv.dtype), k.to(qkv.dtype)  # (the official code leaves them fp32: a crash in pure bf16)
            out = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=mask)
            seq = seq + block.attn.proj(out.transpose(1, 2).reshape(b, n, -1))
            seq = seq + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(seq))))
        visual = seq.view(b, t, COND_TOKENS + n_patch, -1)[:, :, COND_TOKENS:].flatten(1, 2)
        return p.predictor_proj(p.predictor_norm(visual)).view(b, t, n_patch, -1)


def _shape(request) -> str:
    return "tiny" if request.config.getoption("benchmark_disable") else "seed"


def _models(shape: str, device):
    s = SHAPES[shape]
    torch.manual_seed(0)
    predictor = ACPredictor(s["visual_dim"], s["action"], s["state"], (s["grid"], s["grid"]), dim=s["dim"],
                            depth=s["depth"], heads=s["heads"]).to(device)
    with torch.device("meta"):  # never run: features are given, as from the feature cache
        encoder = DinoV2Encoder(14 * s["grid"])
    ours = ACWorldModel(encoder, predictor, decoder=None, auto_steps=2)
    official = ACWorldModel(encoder, OfficialStylePredictor(predictor), decoder=None, auto_steps=2)
    return ours, official, s


def _clip(s, device):
    b, t = s["batch"], s["frames"]
    return {"obs": torch.zeros(b, t, 3, 1, 1, device=device),  # only its frame count is read (no decoder)
            "visual": torch.randn(b, t, s["grid"] ** 2, s["visual_dim"], device=device) * 5,
            "action": torch.randn(b, t, s["action"], device=device),
            "proprio": torch.randn(b, t, s["state"], device=device)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["official", "ours"])
def test_train_step(benchmark, request, bench_utils, device, variant, dtype):
    shape = _shape(request)
    ours, official, s = _models(shape, device)
    inputs = _clip(s, device)
    amp = torch.bfloat16 if dtype == "bf16" else torch.float32

    def loss_of(model):
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            return model(**inputs)["loss"]

    with torch.no_grad():  # the same objective on the same weights and inputs
        ref, other = float(loss_of(ours)), float(loss_of(official))
    assert other == pytest.approx(ref, rel=1e-4 if dtype == "fp32" else 2e-2)
    model = ours if variant == "ours" else official
    opt = torch.optim.AdamW(ours.predictor.parameters(), lr=1e-4, weight_decay=0.04)

    def step():
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bench_utils.synchronize(device)
        return loss

    benchmark.group = f"ac_train_step[{shape}]"
    rounds = 2 if device.type == "cpu" else 10
    loss = benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(shape=shape, device=bench_utils.device_name(device), variant=variant, dtype=dtype,
                                tokens=s["frames"] * (COND_TOKENS + s["grid"] ** 2))
    if benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["seconds_per_step"] = seconds
    _seconds[(shape, variant, dtype)] = seconds
    if variant == "ours" and (shape, "official", dtype) in _seconds:
        benchmark.extra_info["speedup_vs_official"] = _seconds[(shape, "official", dtype)] / seconds


@pytest.mark.parametrize("variant", ["recompute", "kv_cache"])
def test_rollout(benchmark, request, bench_utils, device, variant):
    shape = _shape(request)
    ours, _, s = _models(shape, device)
    ours.eval()
    clip = _clip(s, device)
    visual0, actions, states = clip["visual"][:, :1], clip["action"], clip["proprio"]
    kv = variant == "kv_cache"
    with torch.no_grad():  # an evaluation rollout: the differentiable one (for planning) keeps every graph
        expected = ours.rollout(None, states, actions, visual0=visual0, kv_cache=not kv)["z"]

    @torch.no_grad()
    def rollout():
        z = ours.rollout(None, states, actions, visual0=visual0, kv_cache=kv)["z"]
        bench_utils.synchronize(device)
        return z

    benchmark.group = f"ac_rollout[{shape}]"
    z = benchmark.pedantic(rollout, rounds=2 if device.type == "cpu" else 10, warmup_rounds=1, iterations=1)
    assert float((z - expected).norm() / expected.norm()) < 1e-4
    benchmark.extra_info.update(shape=shape, device=bench_utils.device_name(device), variant=variant,
                                steps=s["frames"] - 1)
    if benchmark.stats is None:
        return
    _seconds[(shape, "rollout", variant)] = benchmark.stats.stats.mean
    if kv and (shape, "rollout", "recompute") in _seconds:
        benchmark.extra_info["speedup_vs_recompute"] = (_seconds[(shape, "rollout", "recompute")]
                                                        / benchmark.stats.stats.mean)
