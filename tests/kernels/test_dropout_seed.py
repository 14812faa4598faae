"""The Triton attention's dropout seed as device state (kernels/dropout.py): each call draws a new mask,
resetting the state reproduces, the backward uses its forward's mask, the state survives checkpoints,
and (GPU) a captured CUDA graph draws a new mask on every replay.

    python -m pytest tests/kernels/test_dropout_seed.py -x -q
"""
from __future__ import annotations

import pytest
import torch

from dinowm.checkpoint import capture_rng_state, restore_rng_state
from dinowm.models.predictor import ViTPredictor
from kernels import attention, dropout, reference
from kernels.frames import FrameLayout

TINY = attention.AttentionConfig(fwd=(16, 16, 4, 3), dkdv=(16, 16, 4, 2), dq=(16, 16, 4, 2))
P_DROP = 0.3


def case(n_frames=2, tokens=9, head_dim=24, device="cpu"):
    frame_ids = reference.frame_ids_for(n_frames, tokens)
    q, k, v, do = (torch.randn(1, 2, frame_ids.numel(), head_dim, device=device) for _ in range(4))
    return q, k, v, do, FrameLayout(frame_ids, head_dim).to(device)  # tile lists of the shipped configs cached


def test_successive_calls_draw_new_masks_and_a_reset_reproduces():
    q, k, v, _, layout = case()
    seeds = dropout.DropoutSeed(seed=5)
    outs = [attention.block_causal_attention_triton(q, k, v, layout, dropout_p=P_DROP, config=TINY,
                                                    seed=seeds.next()) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])
    assert int(seeds.state) == dropout.seed_value(5) + 2  # advanced in place, once per call
    seeds.reseed(5)
    again = attention.block_causal_attention_triton(q, k, v, layout, dropout_p=P_DROP, config=TINY, seed=seeds.next())
    assert torch.equal(again, outs[0])


def test_backward_uses_its_forward_mask_even_after_the_state_moved_on():
    q, k, v, do, layout = case()
    seeds = dropout.DropoutSeed(seed=11)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    seed = seeds.next()
    out = attention.block_causal_attention_triton(*leaves, layout, dropout_p=P_DROP, config=TINY, seed=seed)
    seeds.next()  # another layer's / the next step's draw before this backward runs
    grads = torch.autograd.grad(out, leaves, do)
    keep = attention.dropout_keep_mask(seed, 1, 2, q.shape[2], P_DROP)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    out_ref = reference.block_causal_attention_ref(*ref, layout.frame_ids, dropout_p=P_DROP, dropout_keep=keep)
    grads_ref = torch.autograd.grad(out_ref, ref, do.double())
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-5)


def predictor():
    return ViTPredictor(4, 2, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=32, dropout=P_DROP,
                        attention_backend="triton", layernorm_linear_backend="reference").train()


def test_predictor_layers_and_calls_draw_distinct_masks_and_the_seed_reproduces():
    torch.manual_seed(3)
    model = predictor()
    for m in model.modules():  # only the attention-probability dropout: torch's nn.Dropout off
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 8, 32)
    start = int(model.dropout_seed.state)
    a, b = model(x), model(x)
    assert not torch.equal(a, b)
    assert int(model.dropout_seed.state) == start + 2 * 2  # depth 2: one value per layer per call
    dropout.set_states(model, [start])
    assert torch.equal(model(x), a)
    with torch.no_grad():  # eval: no attention dropout, the state is left alone
        model.eval()(x)
    assert int(model.dropout_seed.state) == start + 2
    # a model built under the same torch seed starts from the same state
    torch.manual_seed(3)
    assert int(predictor().dropout_seed.state) == start


def test_state_survives_a_checkpoint_and_older_checkpoints_still_load():
    model = predictor()
    model.dropout_seed.next(5)
    state = capture_rng_state(model)
    saved = int(model.dropout_seed.state)
    model.dropout_seed.next(3)
    restore_rng_state(state, model)
    assert int(model.dropout_seed.state) == saved
    older = {k: v for k, v in state.items() if k != "dropout_seeds"}  # written before seeds were saved
    model.dropout_seed.next(3)
    restore_rng_state(older, model)
    assert int(model.dropout_seed.state) == saved + 3
    # not part of the weights: state dicts (checkpoints, imported official weights) are unchanged
    assert not any("dropout_seed" in k or "layouts" in k for k in model.state_dict())
    fresh = predictor()
    fresh.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.gpu
def test_cuda_graph_replays_draw_new_masks_and_a_fixed_seed_reproduces():
    q, k, v, _, layout = case(n_frames=3, tokens=258, head_dim=24, device="cuda")
    q, k, v = (x.bfloat16() for x in (q, k, v))
    seeds = dropout.DropoutSeed(seed=1).cuda()

    def step():
        return block(q, k, v, layout, seeds.next())

    def block(q_, k_, v_, layout_, seed):
        return attention.block_causal_attention_triton(q_, k_, v_, layout_, dropout_p=0.1, seed=seed)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (compiles the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    seeds.reseed(1)
    with torch.cuda.graph(graph):
        out = step()
    seeds.reseed(1)
    graph.replay()
    first = out.clone()
    graph.replay()
    second = out.clone()
    assert not torch.equal(first, second), "each replay must draw a new mask"
    seeds.reseed(1)
    graph.replay()
    assert torch.equal(out, first), "the same seed state must reproduce the mask"
    eager = dropout.DropoutSeed(seed=1).cuda()
    assert torch.equal(block(q, k, v, layout, eager.next()), first), "the graph draws what eager draws"
