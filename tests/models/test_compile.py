"""Both world models under torch.compile(fullgraph=True): forward and backward (AOT autograd) trace without
graph breaks on the CPU attention backends (and on the Triton one under the interpreter), dropout on,
also under bf16 autocast; no recompilation when called again in train or eval mode; compiled losses and
gradients equal eager ones on fresh random inputs.

    python -m pytest tests/models/test_compile.py -x -q

Tiny shapes, depth 1 and the `aot_eager` compile backend (graph capture and the AOT forward/backward
graphs without inductor's code generation, which takes minutes on 2 cores); one inductor case.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from dinowm.models.ac_predictor import ACPredictor
from dinowm.models.ac_world_model import ACWorldModel
from dinowm.models.decoder import VQVAEDecoder
from dinowm.models.embeddings import ProprioceptiveEmbedding
from dinowm.models.encoder import DinoV2Encoder
from dinowm.models.predictor import ViTPredictor
from dinowm.models.world_model import VWorldModel
from kernels import dropout as dropout_seed

B, T, P = 2, 3, 4  # 2 x 2 patches of a 28 px encoder input


@functools.lru_cache(maxsize=None)
def encoder():  # frozen, and not run (the inputs carry cached features): one instance serves every test
    return DinoV2Encoder(image_size=28)


def tiny_decoder():
    return VQVAEDecoder(emb_dim=384, channel=8, n_res_block=1, n_res_channel=4, n_embed=4)


def dino(backend):
    predictor = ViTPredictor(P, T - 1, dim=404, depth=1, heads=2, dim_head=16, mlp_dim=32, dropout=0.1,
                             attention_backend=backend, layernorm_linear_backend="reference")
    return VWorldModel(encoder(), ProprioceptiveEmbedding(3, 10), ProprioceptiveEmbedding(6, 10),
                       predictor, tiny_decoder(), num_hist=T - 1, num_pred=1)


def ac(backend):
    predictor = ACPredictor(visual_dim=384, action_dim=6, state_dim=3, grid=(2, 2), dim=32, depth=1, heads=2,
                            attention_backend=backend, layernorm_linear_backend="reference", num_frames=T - 1)
    return ACWorldModel(encoder(), predictor, tiny_decoder(), auto_steps=2)


FAMILIES = {"dino": dino, "ac": ac}


def batch():
    """Fresh random inputs (cached features: the frozen encoder is not what is compiled here)."""
    return dict(obs=torch.rand(B, T, 3, 32, 32) * 2 - 1, proprio=torch.randn(B, T, 3), action=torch.randn(B, T, 6),
                visual=torch.randn(B, T, P, 384))


def loss_and_grads(model, call, inputs, seed, amp=False):
    """One training step's loss and parameter gradients, from the same random state (torch's generator and
    the Triton dropout seed)."""
    torch.manual_seed(seed)
    dropout_seed.reseed(model, seed)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = call(**inputs)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach().float(), grads


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_compiled(family, backend, amp=False, compile_backend="aot_eager", tol=1e-6, again=False):
    torch._dynamo.reset()  # fresh caches: every test's compile counts from zero
    torch.manual_seed(0)
    model = FAMILIES[family](backend).train()
    counter = CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break raises
    inputs = batch()
    loss_c, grads_c = loss_and_grads(model, compiled, inputs, seed=1, amp=amp)
    loss_e, grads_e = loss_and_grads(model, model, inputs, seed=1, amp=amp)
    assert counter.frame_count == 1
    assert rel(loss_c, loss_e) <= tol, (float(loss_c), float(loss_e))
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    worst = max(rel(grads_c[n], grads_e[n]) for n in grads_e)
    assert worst <= (2e-2 if amp else 100 * tol), worst
    if not again:
        return
    # the same shapes again: no recompilation, in train mode and (after its one compile) in eval mode
    loss_and_grads(model, compiled, batch(), seed=2, amp=amp)
    assert counter.frame_count == 1
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
        compiled(**batch())
        compiled(**batch())
    assert counter.frame_count == 2
    model.train()
    loss_and_grads(model, compiled, batch(), seed=3, amp=amp)
    assert counter.frame_count == 2


@pytest.mark.parametrize("family", ["dino", "ac"])
def test_world_model_compiles_fullgraph_matches_eager_and_never_recompiles(family):
    check_compiled(family, "sdpa", again=True)


@pytest.mark.parametrize("family", ["dino", "ac"])
def test_reference_model_compiles_fullgraph_and_matches_eager(family):
    check_compiled(family, "reference")


@pytest.mark.parametrize("family", ["dino", "ac"])
def test_world_model_compiles_under_bf16_autocast(family):
    check_compiled(family, "sdpa", amp=True)


@pytest.mark.parametrize("family", ["dino", "ac"])
def test_world_model_compiles_with_triton_attention_under_the_interpreter(family):
    pytest.importorskip("triton")
    check_compiled(family, "triton")  # dino: in-kernel dropout from the model's DropoutSeed


@pytest.mark.slow
def test_world_model_compiles_with_inductor():
    import torch._inductor.config

    # inductor's own RNG would draw other dropout masks than eager: use torch's for the comparison
    with torch._inductor.config.patch(fallback_random=True):
        check_compiled("dino", "sdpa", compile_backend="inductor", tol=1e-5)


def test_layouts_are_built_at_construction_and_not_saved():
    model = dino("sdpa")
    predictor = model.predictor
    assert set(predictor.layouts) == {"1", "2"}
    assert predictor.layouts["2"].counts == (P, P)
    assert not any(k.startswith("predictor.layouts") or "dropout_seed" in k for k in model.state_dict())
    # the RoPE tables of the AC layouts stay fp32 when the model is cast
    predictor = ac("sdpa").predictor.to(torch.bfloat16)
    assert predictor.layouts["2"].cos.dtype == torch.float32
    assert not any("layouts" in k for k in predictor.state_dict())
