"""VWorldModel: forward/loss contract of docs/contract.md §7, gradient isolation, rollout (docs/contract.md §8), build_world_model."""
import warnings

import pytest
import torch

from dinowm.config import DataConfig, ModelConfig
from dinowm.models.decoder import VQVAEDecoder
from dinowm.models.embeddings import ProprioceptiveEmbedding
from dinowm.models.encoder import DinoV2Encoder
from dinowm.models.predictor import ViTPredictor
from dinowm.models.world_model import VWorldModel, build_world_model

B, T, S, P = 2, 4, 64, 16  # encoder input 56 -> 4x4 patches; decoder 16 * 4 = 64 px
DP, DA = 3, 18


def small_model(concat_dim=1, dropout=0.0, backend="auto"):
    emb = 10 if concat_dim == 1 else 384
    dim = 384 + 2 * emb if concat_dim == 1 else 384
    tokens = P if concat_dim == 1 else P + 2
    return VWorldModel(
        encoder=DinoV2Encoder(image_size=56),
        proprio_encoder=ProprioceptiveEmbedding(DP, emb),
        action_encoder=ProprioceptiveEmbedding(DA, emb),
        predictor=ViTPredictor(tokens, 3, dim=dim, depth=2, heads=4, dim_head=16, mlp_dim=64, dropout=dropout,
                               attention_backend=backend, layernorm_linear_backend=backend),
        decoder=VQVAEDecoder(emb_dim=384, channel=32, n_res_block=1, n_res_channel=8, n_embed=4),
        num_hist=3, num_pred=1, concat_dim=concat_dim,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return small_model()


@pytest.fixture(scope="module")
def batch(model):
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(B, T, 3, S, S, generator=g) * 2 - 1
    proprio, action = torch.randn(B, T, DP, generator=g), torch.randn(B, T, DA, generator=g)
    return obs, proprio, action, model.encode_visual(obs)


def test_forward_outputs(model, batch):
    obs, proprio, action, visual = batch
    out = model(obs, proprio, action, decode_prediction=True)
    for k in ("loss", "z_loss", "z_visual_loss", "z_proprio_loss", "decoder_recon_loss", "decoder_pred_loss"):
        assert out[k].shape == (), k
    assert out["recon"].shape == (B, T, 3, S, S)
    assert out["pred_image"].shape == (B, 3, 3, S, S)
    assert not out["decoder_pred_loss"].requires_grad
    torch.testing.assert_close(out["loss"], out["z_loss"] + out["decoder_recon_loss"])
    assert visual.shape == (B, T, P, 384) and not visual.requires_grad
    # cached features give exactly the same result; without decode_prediction no prediction decode
    out2 = model(obs, proprio, action, visual=visual)
    assert torch.equal(out2["loss"], out["loss"]) and "pred_image" not in out2


def test_visual_given_skips_encoder(model, batch, monkeypatch):
    obs, proprio, action, visual = batch
    monkeypatch.setattr(model.encoder, "forward", lambda *a: pytest.fail("encoder ran"))
    model(obs, proprio, action, visual=visual)


def test_embedding_layout(model, batch):
    _, proprio, action, visual = batch
    z = model.embed(visual, proprio, action)
    assert z.shape == (B, T, P, 404)
    assert torch.equal(z[..., :384], visual)
    torch.testing.assert_close(z[..., 384:394], model.proprio_encoder(proprio)[:, :, None].expand(-1, -1, P, -1))
    torch.testing.assert_close(z[..., 394:], model.action_encoder(action)[:, :, None].expand(-1, -1, P, -1))
    conv = model.action_encoder.patch_embed(action.transpose(1, 2)).transpose(1, 2)  # the original's Conv1d path
    torch.testing.assert_close(model.action_encoder(action), conv)


def test_z_loss_excludes_action_channels(model, batch):
    obs, proprio, action, visual = batch
    base = model(obs, proprio, action, visual=visual)
    action2 = action.clone()
    action2[:, -1] += 5.0  # the target frame's action: only its action channels of z change
    out = model(obs, proprio, action2, visual=visual)
    assert torch.equal(out["z_loss"], base["z_loss"])
    proprio2 = proprio.clone()
    proprio2[:, -1] += 5.0  # the target frame's proprio is part of the loss
    assert not torch.equal(model(obs, proprio2, action, visual=visual)["z_proprio_loss"], base["z_proprio_loss"])


def test_gradient_isolation(model, batch):
    obs, proprio, action, visual = batch
    model.zero_grad(set_to_none=True)
    model(obs, proprio, action)["decoder_recon_loss"].backward()
    for m in (model.predictor, model.action_encoder, model.proprio_encoder, model.encoder):
        assert all(p.grad is None for p in m.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())

    model.zero_grad(set_to_none=True)
    model(obs, proprio, action, visual=visual)["z_loss"].backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())
    for m in (model.predictor, model.action_encoder, model.proprio_encoder):
        assert all(p.grad is not None for p in m.parameters())
    model.zero_grad(set_to_none=True)


def test_parameter_groups(model):
    groups = model.parameter_groups()
    assert set(groups) == {"predictor", "embeddings", "decoder"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not set(ids) & {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups["embeddings"]} == {
        id(p) for m in (model.action_encoder, model.proprio_encoder) for p in m.parameters()}


def test_rollout_equals_repeated_predictor(model, batch):
    obs, proprio, _, visual = batch
    actions = torch.randn(B, 3 + 2, DA)
    z = model.rollout(obs[:, :3], proprio[:, :3], actions)["z"]
    assert z.shape == (B, 5, P, 404)
    assert torch.equal(model.rollout(None, proprio[:, :3], actions, visual0=visual[:, :3])["z"], z)
    # by hand: context, then predict from the last 3 latents, take the last frame, set the next action
    ref = model.embed(visual[:, :3], proprio[:, :3], actions[:, :3])
    for t in (3, 4):
        src = ref[:, -3:]
        nxt = model.predictor(src.flatten(1, 2)).unflatten(1, (3, P))[:, -1:]
        nxt = torch.cat([nxt[..., :-10], model.action_encoder(actions[:, t:t + 1])[:, :, None].expand(-1, -1, P, -1)], -1)
        ref = torch.cat([ref, nxt], dim=1)
    torch.testing.assert_close(z, ref)
    assert model.decode(z, S).shape == (B, 5, 3, S, S)


def test_decoder_output_resized_to_image_size(model, batch):
    obs, proprio, action, visual = batch
    small = torch.nn.functional.interpolate(obs.flatten(0, 1), size=(48, 48), mode="bilinear", antialias=True)
    out = model(small.unflatten(0, (B, T)), proprio, action, visual=visual)  # decoder gives 64 px -> 48
    assert out["recon"].shape == (B, T, 3, 48, 48)


def test_bf16_autocast_with_resized_decoder_output(model, batch):
    """bf16 autocast (the CPU demo and GPU default) through a resized decode: finite losses near fp32."""
    obs, proprio, action, visual = batch
    small = torch.nn.functional.interpolate(obs.flatten(0, 1), size=(48, 48), mode="bilinear", antialias=True)
    small = small.unflatten(0, (B, T))
    model.eval()
    with torch.no_grad():
        ref = model(small, proprio, action, visual=visual)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(small, proprio, action, visual=visual, decode_prediction=True)
    assert out["recon"].shape == (B, T, 3, 48, 48) and out["pred_image"].shape == (B, 3, 3, 48, 48)
    for key in ("loss", "z_loss", "decoder_recon_loss"):
        assert torch.isfinite(out[key])
        assert abs(float(out[key]) - float(ref[key])) <= 0.05 * abs(float(ref[key])) + 1e-3, key


def test_concat_dim_0():
    torch.manual_seed(0)
    m = small_model(concat_dim=0)
    obs = torch.rand(1, T, 3, S, S) * 2 - 1
    visual = m.encode_visual(obs)
    proprio, action = torch.randn(1, T, DP), torch.randn(1, T, DA)
    z = m.embed(visual, proprio, action)
    assert z.shape == (1, T, P + 2, 384)
    out = m(obs, proprio, action, visual=visual)
    assert out["loss"].shape == ()
    action2 = action.clone()
    action2[:, -1] += 5.0
    assert torch.equal(m(obs, proprio, action2, visual=visual)["z_loss"], out["z_loss"])
    assert m.rollout(obs[:, :3], proprio[:, :3], torch.randn(1, 5, DA))["z"].shape == (1, 5, P + 2, 384)


def test_reference_vs_sdpa_model_fp32():
    torch.manual_seed(0)
    ref = small_model(backend="reference").eval()
    fast = small_model(backend="auto").eval()
    for layer in fast.predictor.transformer.layers:
        layer[0].backend = "sdpa"
    fast.load_state_dict(ref.state_dict())
    obs = torch.rand(1, T, 3, S, S) * 2 - 1
    visual, proprio, action = ref.encode_visual(obs), torch.randn(1, T, DP), torch.randn(1, T, DA)
    a, b = ref(obs, proprio, action, visual=visual), fast(obs, proprio, action, visual=visual)
    for k in ("z_loss", "decoder_recon_loss"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_build_world_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build_world_model(ModelConfig(encoder_image_size=56), DataConfig(frameskip=5), action_dim=9)
    assert m.action_encoder.patch_embed.weight.shape == (10, 45, 1)
    assert m.proprio_encoder.patch_embed.weight.shape == (10, 3, 1)
    assert m.predictor.pos_embedding.shape == (1, 3 * 16, 404)
    assert len(m.predictor.transformer.layers) == 6
    assert m.decoder.dec.blocks[0].weight.shape == (384, 384, 3, 3)
    assert m.num_hist == 3 and m.num_pred == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m0 = build_world_model(ModelConfig(encoder_image_size=56, concat_dim=0, action_emb_dim=384, proprio_emb_dim=384,
                                           predictor_depth=1), DataConfig())
    assert m0.predictor.pos_embedding.shape == (1, 3 * 18, 384)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_embeddings_have_one_precision_on_every_path_under_bf16_autocast(model, batch, backend):
    """Context latents (embed), rolled-out latents (replace_action) and the fp32 embedding agree."""
    _, proprio, action, visual = batch
    ea = model.action_dim
    expected = torch.nn.functional.linear(action.double(), model.action_encoder.weight.double(),
                                          model.action_encoder.bias.double())  # (B, T, Ea)
    model.embedding_backend = backend
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model.embed(visual, proprio, action)  # (B, T, P, 404) in visual's dtype (fp32)
            replaced = model.replace_action(torch.zeros_like(z), action)
    finally:
        model.embedding_backend = "auto"
    for got in (z[:, :, 0, -ea:], replaced[:, :, 0, -ea:]):
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)  # not bf16 (~4e-3)
    torch.testing.assert_close(z[..., -ea:], replaced[..., -ea:], rtol=1e-6, atol=1e-6)  # summation order only
