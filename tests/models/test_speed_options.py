"""Speed options of the training step, both families: the decoder on k of the T frames / every n-th step
(training.decoder_frames / decoder_every_steps), activation checkpointing of the predictor blocks, and the
decoder's execution choices (channels_last, fp32 convolutions). Defaults are the original's step."""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

from dinowm import perf
from dinowm.config import ConfigError, load_config
from dinowm.models.decoder import VQVAEDecoder
from dinowm.models.world_model import build_world_model

B, T, S = 3, 4, 32  # 28 px encoder input -> 2x2 patches, decoded to 32 px
FAMILIES = {
    "vit": ["--model.predictor_depth", "2", "--model.predictor_heads", "2", "--model.predictor_dim_head", "16",
            "--model.predictor_mlp_dim", "64"],
    "ac": ["--model.predictor", "ac", "--model.ac_dim", "32", "--model.ac_depth", "2", "--model.ac_heads", "2",
           "--model.auto_steps", "2"],
}


@functools.lru_cache(maxsize=None)
def _built(family, dropout):
    cfg = load_config("franka.toml", ["--data.img_size", str(S), "--model.encoder_image_size", "28",
                                      "--model.predictor_dropout", str(dropout), *FAMILIES[family]])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random encoder
        model = build_world_model(cfg.model, cfg.data, action_dim=2)
    model.decoder = VQVAEDecoder(emb_dim=384, channel=32, n_res_block=1, n_res_channel=8, n_embed=4)  # fast
    return model


def build(family, dropout=0.0):
    return copy.deepcopy(_built(family, dropout))


def inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(B, T, 3, S, S, generator=g) * 2 - 1
    batch = dict(obs=obs, proprio=torch.randn(B, T, 3, generator=g), action=torch.randn(B, T, 2 * 5, generator=g))
    batch["visual"] = model.encode_visual(obs) + 0.1 * torch.randn(B, T, 4, 384, generator=g)
    return batch


def latents(model, batch):
    """What the decoder is trained on, computed here from the family's own embed (detached)."""
    return model.embed(batch["visual"], batch["proprio"], batch["action"]).detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_train_the_decoder_on_every_frame_every_step(family):
    model = build(family).eval()
    batch = inputs(model)
    out = model(**batch)
    recon = F.mse_loss(model.decode(latents(model, batch), S), batch["obs"])
    torch.testing.assert_close(out["decoder_recon_loss"], recon, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"], out["z_loss"] + recon, rtol=1e-6, atol=0)
    assert out["recon"].shape == (B, T, 3, S, S)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 2])
def test_decoder_frames_trains_on_k_distinct_random_frames_per_sample(family, k):
    model = build(family).eval()
    batch = inputs(model)
    z = latents(model, batch)
    seen = []
    hook = model.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    full = model.decode(z, S)  # (B, T, 3, S, S): the decoder's input of every frame, in (b, t) order
    every_frame = seen.pop()  # (B*T, 384, g, g)
    picks = []
    for _ in range(3):
        out = model(**batch, decoder_frames=k)
        fed = seen.pop()  # (B*k, 384, g, g)
        assert fed.shape[0] == B * k and not seen
        rows = [next(i for i in range(B * T) if torch.equal(x, every_frame[i])) for x in fed]
        pick = [[r % T for r in rows[b * k:(b + 1) * k]] for b in range(B)]
        assert all(r // T == b for b in range(B) for r in rows[b * k:(b + 1) * k])  # each sample's own frames
        assert all(len(set(p)) == k for p in pick)  # distinct
        expected = torch.stack([F.mse_loss(full[b, t], batch["obs"][b, t]) for b in range(B) for t in pick[b]]).mean()
        torch.testing.assert_close(out["decoder_recon_loss"], expected, rtol=1e-5, atol=1e-7)
        picks.append(pick)
    hook.remove()
    assert len({str(p) for p in picks}) > 1  # drawn anew each step


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_decoder_step_gives_the_decoder_no_gradient(family):
    model = build(family).train()
    batch = inputs(model)
    out = model(**batch, train_decoder=False)
    assert "decoder_recon_loss" not in out and "recon" not in out
    torch.testing.assert_close(out["loss"], out["z_loss"], rtol=0, atol=0)
    out["loss"].backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert any(p.grad is not None for p in model.predictor.parameters())
    # a logging step still shows every frame's reconstruction (decoded without gradients)
    out = model(**batch, train_decoder=False, decode_prediction=True)
    assert out["recon"].shape == (B, T, 3, S, S) and not out["recon"].requires_grad


def test_decoder_frames_is_validated():
    with pytest.raises(ConfigError, match="training.decoder_frames"):
        load_config("franka.toml", ["--training.decoder_frames", "5"])
    with pytest.raises(ConfigError, match="training.decoder_every_steps"):
        load_config("franka.toml", ["--training.decoder_every_steps", "0"])


def grads_and_saved(model, batch, checkpointing):
    perf.configure(model, torch.device("cpu"), torch.float32, activation_checkpointing=checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both runs
    with perf.SavedTensors(exclude=list(model.parameters()) + list(batch.values()),
                           scopes={"predictor": model.predictor}) as saved:
        out = model(**batch, train_decoder=False)
    out["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved.by_scope["predictor"]


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(family):
    model = build(family, dropout=0.2).train()  # dropout on: the recomputation must draw the same masks
    batch = inputs(model)
    plain, plain_bytes = grads_and_saved(model, batch, False)
    ckpt, ckpt_bytes = grads_and_saved(model, batch, True)
    assert plain.keys() == ckpt.keys() and any(n.startswith("predictor.") for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)


def test_saved_tensor_bytes_count_each_storage_once():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    with perf.SavedTensors(exclude=[x, w]) as saved:
        h = x @ w  # saves x and w: excluded
        y = h.sin() * h.cos()  # sin and cos save h (once), mul saves both results
    assert saved.total == 3 * h.numel() * 4
    y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_execution_choices_compute_the_same(dtype, monkeypatch):
    model = build("vit").eval()
    z = torch.randn(2, 384, 2, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        ref = model.decoder(z).float()
        model.decoder.channels_last = True
        cl = model.decoder(z).float()
        model.decoder.fp32_convs = True
        fp32 = model.decoder(z)
    torch.testing.assert_close(cl, ref, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-4 if dtype == torch.float32 else 2e-2)
    assert fp32.dtype == torch.float32
    # the probe: without bf16 instructions a bf16 run's convolutions run in fp32
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: False)
    assert perf.decoder_fp32_convs(torch.device("cpu"), torch.bfloat16)[0] is True
    monkeypatch.setattr(perf, "cpu_has_bf16", lambda: True)
    assert perf.decoder_fp32_convs(torch.device("cpu"), torch.bfloat16)[0] is False
