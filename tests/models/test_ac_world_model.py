"""ACWorldModel: the training objective (teacher forcing + rollout loss on layer-normed latents), the
decoder on detached latents, rollouts with a KV cache against full recomputation, optimiser groups."""
import functools

import pytest
import torch
import torch.nn.functional as F

from dinowm.models.ac_predictor import ACPredictor
from dinowm.models.ac_world_model import ACWorldModel
from dinowm.models.decoder import VQVAEDecoder
from dinowm.models.encoder import DinoV2Encoder

GRID = 2  # 28 px encoder input: 2 x 2 patches


@functools.lru_cache(maxsize=None)
def encoder():  # frozen and never trained: one instance serves every test
    return DinoV2Encoder(image_size=14 * GRID)


def model(decoder=True, auto_steps=2, **kw):
    args = dict(visual_dim=384, action_dim=3, state_dim=2, grid=(GRID, GRID), dim=48, depth=2, heads=2)
    args.update(kw)
    return ACWorldModel(encoder(), ACPredictor(**args),
                        VQVAEDecoder(emb_dim=384) if decoder else None, auto_steps=auto_steps)


def clip(b=2, t=4):
    return dict(obs=torch.rand(b, t, 3, 32, 32) * 2 - 1, proprio=torch.randn(b, t, 2), action=torch.randn(b, t, 3),
                visual=torch.randn(b, t, GRID * GRID, 384) * 3 + 0.5)


def ln(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-5)


def rel(x, ref):
    return float((x.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


def test_losses_are_l1_of_layer_normed_latents_with_teacher_forcing_and_rollout():
    m = model(auto_steps=3)
    c = clip(t=5)
    out = m(**c)
    h, a, s = c["visual"], c["action"], c["proprio"]
    target = ln(h[:, 1:])
    p = m.predictor(h[:, :4], a[:, :4], s[:, :4])
    assert torch.allclose(out["z_tf_loss"], (ln(p) - target).abs().mean())
    p2 = m.predictor(torch.cat([h[:, :1], p[:, :1]], 1), a[:, :2], s[:, :2])[:, -1:]  # fed back: a prediction
    p3 = m.predictor(torch.cat([h[:, :1], p[:, :1], p2], 1), a[:, :3], s[:, :3])[:, -1:]
    ar = torch.cat([ln(p[:, :1]), ln(p2), ln(p3)], 1)
    assert torch.allclose(out["z_rollout_loss"], (ar - target[:, :3]).abs().mean())
    assert torch.allclose(out["copy_last_loss"], (ln(h[:, :-1]) - target).abs().mean())
    assert torch.allclose(out["loss"], out["z_tf_loss"] + out["z_rollout_loss"] + out["decoder_recon_loss"])
    assert out["loss"].dim() == 0


def test_decoder_learns_only_from_detached_latents():
    m = model()
    out = m(**clip())
    out["decoder_recon_loss"].backward()
    assert all(p.grad is None for p in m.predictor.parameters())
    assert any(p.grad is not None for p in m.decoder.parameters())


def test_rollout_loss_has_gradients_through_the_fed_back_prediction():
    m = model()
    c = clip()
    c["visual"].requires_grad_(True)
    m(**c)["z_rollout_loss"].backward()
    # frame 1's features are never an input of the rollout: only frame 0 (through the fed-back prediction)
    grad = c["visual"].grad
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1:].abs().sum() == 0


def test_without_decoder():
    m = model(decoder=False)
    out = m(**clip(), decode_prediction=True)
    assert "recon" not in out and "decoder_recon_loss" not in out
    assert torch.equal(out["loss"], out["z_loss"])
    assert "decoder" not in m.parameter_groups()


def test_decode_prediction_images():
    out = model()(**clip(), decode_prediction=True)
    assert out["pred_image"].shape == (2, 3, 3, 32, 32) and out["recon"].shape == (2, 4, 3, 32, 32)


@pytest.mark.parametrize("context", [1, 2])
def test_kv_cache_rollout_equals_full_recomputation(context):
    m = model().eval()
    visual0 = torch.randn(2, context, GRID * GRID, 384) * 3
    steps = 6
    actions, states = torch.randn(2, context + steps, 3), torch.randn(2, context + steps, 2)
    cached = m.rollout(None, states, actions, visual0=visual0)["z"]
    full = m.rollout(None, states, actions, visual0=visual0, kv_cache=False)["z"]
    assert cached.shape == (2, context + steps, GRID * GRID, 384)
    assert rel(cached, full) <= 1e-5
    assert torch.equal(cached[:, :context], ln(visual0))  # the context latents come back as they are
    # the first prediction is the predictor's output on the context, layer-normed
    first = m.predictor(visual0, actions[:, :context], states[:, :context])[:, -1]
    assert rel(cached[:, context], ln(first)) < 1e-5


def test_rollout_repeats_the_last_known_state():
    m = model().eval()
    visual0, actions = torch.randn(1, 1, GRID * GRID, 384), torch.randn(1, 5, 3)
    known = torch.randn(1, 1, 2)
    z = m.rollout(None, known, actions, visual0=visual0)["z"]
    z_explicit = m.rollout(None, known.expand(1, 5, 2), actions, visual0=visual0)["z"]
    assert torch.equal(z, z_explicit)


def test_rollout_from_images_encodes_the_context():
    m = model().eval()
    obs0 = torch.rand(1, 1, 3, 32, 32) * 2 - 1
    z = m.rollout(obs0, torch.randn(1, 1, 2), torch.randn(1, 3, 3))["z"]
    assert torch.allclose(z[:, 0], m.embed(m.encode_visual(obs0))[:, 0])
    assert m.decode(z, 32).shape == (1, 3, 3, 32, 32)
    visual, proprio, action = m.split(z)
    assert visual is z and proprio is None and action is None


def test_parameter_groups_exempt_biases_and_1d_params_from_weight_decay():
    m = model()
    decay, no_decay = m.parameter_groups()["predictor"]
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim == 2 for p in decay["params"])
    count = sum(p.numel() for p in decay["params"] + no_decay["params"])
    assert count == sum(p.numel() for p in m.predictor.parameters())
