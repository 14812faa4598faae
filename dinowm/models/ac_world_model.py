"""The V-JEPA 2-AC world model: frozen DINOv2 encoder, the action-conditioned
predictor and an optional VQ-VAE decoder (docs/ac_predictor.md).

Latents z are the encoder features after a parameter-free layer norm (eps 1e-5): z: (B, T, P, D_enc).
The predictor applies that layer norm itself (fused with `predictor_embed`), so it is fed raw features
and raw predictions; every prediction is compared (and returned) after the same layer norm.

Training clip of T frames (frames, actions a_t (taken after frame t), states s_t):
    target = LN(h[:, 1:]) (detached)                                h: encoder features (B, T, P, D_enc)
    teacher forcing: p = predictor(h[:, :T-1], a[:, :T-1], s[:, :T-1]);  tf_loss = L1(LN(p), target)
    rollout (auto_steps = k): x = [h_0, p_0]; repeat k-1 times: x.append(predictor(x, a, s)[:, -1])
                              rollout_loss = L1(LN(x[1:]), target[:, :k])    gradients through the rollout,
                                                                            ground-truth states
    loss = tf_loss + rollout_loss (+ decoder MSE on detached latents when the decoder is on)
The copy-last-frame baseline (LN(h_t) as the prediction of frame t + 1) is reported as copy_last_loss.

The interface is the DINO world model's (`VWorldModel`): encode_visual, embed, split, decode, forward,
rollout, parameter_groups, context_frames, so evaluation and planning work with either family.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ac_predictor import ACPredictor, KVCache
from .decoder import VQVAEDecoder
from .encoder import DinoV2Encoder, build_encoder
from .world_model import VWorldModel, reconstruction

LATENT_LN_EPS = 1e-5


def latent(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free layer norm over the feature dim, in fp32: features or raw predictions -> latents."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=LATENT_LN_EPS)


class ACWorldModel(nn.Module):
    context_frames = 1  # rollouts start from one observed frame (the official evaluation and planning)

    def __init__(self, encoder: DinoV2Encoder, predictor: ACPredictor, decoder: VQVAEDecoder | None,
                 auto_steps: int = 2):
        super().__init__()
        if auto_steps < 1:
            raise ValueError(f"auto_steps must be >= 1, got {auto_steps}")
        self.encoder = encoder
        self.predictor = predictor
        self.decoder = decoder
        self.auto_steps = auto_steps
        self.encoder.requires_grad_(False)

    # the same definitions as the DINO world model's (they only use self.encoder, self.decoder, self.split)
    encode_visual = VWorldModel.encode_visual
    decode = VWorldModel.decode

    def embed(self, visual: torch.Tensor, proprio: torch.Tensor | None = None,
              action: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded ground truth as latents: visual (B, T, P, D_enc) -> z (B, T, P, D_enc). The AC latent
        holds no proprio/action part; the arguments exist so both families are called alike."""
        return latent(visual)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """z -> (visual (B, T, P, D_enc), None, None): AC latents are visual only."""
        return z, None, None

    def forward(self, obs: torch.Tensor, proprio: torch.Tensor, action: torch.Tensor,
                visual: torch.Tensor | None = None, decode_prediction: bool = False, decoder_frames: int = 0,
                train_decoder: bool = True) -> dict:
        """obs (B, T, 3, S, S) in [-1, 1], proprio = states (B, T, S), action (B, T, A); visual: optional
        cached encoder features (B, T, P, D_enc). Returns the losses (0-dim) and images for logging.
        decoder_frames, train_decoder: see `world_model.reconstruction`."""
        t = obs.shape[1]
        if t < self.auto_steps + 1:
            raise ValueError(f"forward: a clip of {t} frames is too short for auto_steps = {self.auto_steps}")
        if visual is None:
            visual = self.encode_visual(obs)
        target = latent(visual[:, 1:]).detach()  # (B, T-1, P, D)
        raw_tf = self.predictor(visual[:, :-1], action[:, :-1], proprio[:, :-1])  # (B, T-1, P, D)
        z_tf = latent(raw_tf)
        inputs, z_ar = [visual[:, :1], raw_tf[:, :1].to(visual.dtype)], [z_tf[:, :1]]
        for n in range(1, self.auto_steps):
            raw = self.predictor(torch.cat(inputs, dim=1), action[:, :n + 1], proprio[:, :n + 1])[:, -1:]
            inputs.append(raw.to(visual.dtype))
            z_ar.append(latent(raw))
        out = {"z_tf_loss": (z_tf - target).abs().mean(),
               "z_rollout_loss": (torch.cat(z_ar, dim=1) - target[:, :self.auto_steps]).abs().mean()}
        out["z_loss"] = out["z_tf_loss"] + out["z_rollout_loss"]
        with torch.no_grad():
            out["copy_last_loss"] = (latent(visual[:, :-1]) - target).abs().mean()
        out["loss"] = out["z_loss"]
        if self.decoder is not None:
            size = obs.shape[-1]
            # on detached latents: never reaches the predictor
            out.update(reconstruction(self, latent(visual), obs, decoder_frames, train_decoder,
                                      images=decode_prediction))
            if "decoder_recon_loss" in out:
                out["loss"] = out["loss"] + out["decoder_recon_loss"]
            if decode_prediction:
                with torch.no_grad():
                    pred_image = self.decode(z_tf.detach(), size)  # (B, T-1, 3, S, S)
                    out["decoder_pred_loss"] = F.mse_loss(pred_image, obs[:, 1:])
                out["pred_image"] = pred_image
        return out

    def rollout(self, obs0: torch.Tensor, proprio0: torch.Tensor, actions: torch.Tensor,
                visual0: torch.Tensor | None = None, kv_cache: bool = True) -> dict:
        """obs0 (B, h0, 3, S, S), proprio0 (B, n, S) states, actions (B, h0 + H, A)
        -> {"z": (B, h0 + H, P, D_enc)}: the context latents, then one predicted latent per further action.

        Frame t is predicted from frames < t, actions[:, :t] and states[:, :t]; the last action is not
        rolled past. proprio0 holds the known states: the context frames' (planning; future states are
        unknown, so the last known state is repeated) or every frame's (evaluation against a recorded
        episode: ground-truth states, as in training). kv_cache: reuse past frames' keys and values
        (exact); False recomputes every frame each step. Differentiable with respect to the actions (gradient
        planning); callers that need no gradients wrap it in no_grad.
        """
        if visual0 is None:
            visual0 = self.encode_visual(obs0)
        b, h0 = visual0.shape[:2]
        total = actions.shape[1]
        states = proprio0[:, :total]
        if states.shape[1] < total:
            states = torch.cat([states, states[:, -1:].expand(b, total - states.shape[1], -1)], dim=1)
        z = [latent(visual0)]
        cache = KVCache(self.predictor.depth) if kv_cache else None
        frames = visual0  # what the predictor still has to see: all frames, or the new ones with a cache
        for t in range(h0, total):
            first = t - frames.shape[1]
            raw = self.predictor(frames, actions[:, first:t], states[:, first:t], cache=cache)[:, -1:]  # (B, 1, P, D)
            z.append(latent(raw))
            raw = raw.to(visual0.dtype)
            frames = raw if kv_cache else torch.cat([frames, raw], dim=1)
        return {"z": torch.cat(z, dim=1)}

    def parameter_groups(self) -> dict:
        """Trainable parameters by optimiser: the predictor (AdamW; no weight decay on biases and other 1-D
        parameters) and the decoder. The frozen encoder is excluded."""
        decay, no_decay = [], []
        for p in self.predictor.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = {"predictor": [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]}
        if self.decoder is not None:
            groups["decoder"] = [p for p in self.decoder.parameters() if p.requires_grad]
        return groups


def build_ac_world_model(model_cfg, data_cfg, action_dim: int) -> ACWorldModel:
    """The AC world model of a ModelConfig + DataConfig: actions are action_dim * frameskip wide, states the
    data.proprio_start:proprio_end slice of the state."""
    encoder = build_encoder(model_cfg)
    grid = model_cfg.encoder_image_size // encoder.patch_size
    predictor = ACPredictor(
        visual_dim=encoder.emb_dim, action_dim=action_dim * data_cfg.frameskip,
        state_dim=data_cfg.proprio_end - data_cfg.proprio_start, grid=(grid, grid), dim=model_cfg.ac_dim,
        depth=model_cfg.ac_depth, heads=model_cfg.ac_heads, mlp_ratio=model_cfg.ac_mlp_ratio,
        rope_legacy=model_cfg.rope_legacy, attention_backend=model_cfg.attention_backend,
        layernorm_linear_backend=model_cfg.layernorm_linear_backend, num_frames=data_cfg.num_hist)
    decoder = VQVAEDecoder(emb_dim=encoder.emb_dim) if model_cfg.ac_decoder else None
    return ACWorldModel(encoder, predictor, decoder, auto_steps=model_cfg.auto_steps)
