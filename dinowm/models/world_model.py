"""The DINO world model (docs/contract.md §4, §7, §8): frozen DINOv2 encoder, proprio/action embeddings, the
ViT predictor and the VQ-VAE decoder.

Latents (concat_dim = 1, default): every patch token of frame t is [visual 384 | proprio Ep | action Ea]
    z: (B, T, P, 384 + Ep + Ea)           built by `kernels.tiled_embedding`
Latents (concat_dim = 0): the embeddings are two extra tokens per frame (Ep = Ea = 384)
    z: (B, T, P + 2, 384)                 tokens [patches..., proprio, action]

Training sample of T = num_hist + num_pred frames (docs/contract.md §7):
    z_src = z[:, :num_hist];  z_tgt = z[:, num_pred:]
    z_pred = predictor(z_src)
    z_loss = MSE(z_pred without action part, z_tgt without action part (detached))
    recon  = decoder(visual part of z, detached)          all T frames (training.decoder_frames: k of them;
                                                          training.decoder_every_steps: only every n-th step)
    loss   = z_loss + MSE(recon, obs)                     a 0-dim scalar
The decoder output (16g px) is resized to the image size S with bilinear interpolation
(align_corners False, antialias True) when 16g != S (e.g. g = 16, S = 224: 256 -> 224).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import tiled_embedding

from .decoder import VQVAEDecoder
from .embeddings import ProprioceptiveEmbedding
from .encoder import DinoV2Encoder, build_encoder
from .predictor import ViTPredictor


def reconstruction(model, z: torch.Tensor, obs: torch.Tensor, frames: int = 0, train: bool = True,
                   images: bool = False) -> dict:
    """The decoder's training loss on detached latents z (B, T, ...) against obs (B, T, 3, S, S), either family.

    frames: 0 (or T) trains on all T frames (the original); 0 < k < T on k distinct frames per sample, drawn
    at random on the device each step. train: False skips the decoder this step (training.decoder_every_steps;
    no loss, so the decoder gets no gradient and its optimiser leaves it alone). images: the logged
    `recon` must cover all T frames (decoded without gradients when training did not decode them all).
    Returns {"decoder_recon_loss" (0-dim), "recon" (B, T, 3, S, S), detached} as far as computed.
    """
    z = z.detach()
    b, t, size = obs.shape[0], obs.shape[1], obs.shape[-1]
    out = {}
    if train:
        if 0 < frames < t:
            pick = torch.rand(b, t, device=obs.device).argsort(dim=1)[:, :frames]  # (B, k) distinct frames
            rows = torch.arange(b, device=obs.device)[:, None]  # (B, 1)
            recon = model.decode(z[rows, pick], size)  # (B, k, 3, S, S)
            out["decoder_recon_loss"] = F.mse_loss(recon, obs[rows, pick])
        else:
            recon = model.decode(z, size)  # (B, T, 3, S, S)
            out["decoder_recon_loss"] = F.mse_loss(recon, obs)
            out["recon"] = recon.detach()  # for logging; the loss above keeps the graph
    if images and "recon" not in out:
        with torch.no_grad():
            out["recon"] = model.decode(z, size)
    return out


class VWorldModel(nn.Module):
    def __init__(self, encoder: DinoV2Encoder, proprio_encoder: ProprioceptiveEmbedding,
                 action_encoder: ProprioceptiveEmbedding, predictor: ViTPredictor, decoder: VQVAEDecoder,
                 num_hist: int, num_pred: int, concat_dim: int = 1, embedding_backend: str = "auto"):
        super().__init__()
        if concat_dim not in (0, 1):
            raise ValueError(f"concat_dim must be 0 or 1, got {concat_dim}")
        self.encoder = encoder
        self.proprio_encoder = proprio_encoder
        self.action_encoder = action_encoder
        self.predictor = predictor
        self.decoder = decoder
        self.num_hist = num_hist
        self.context_frames = num_hist  # rollouts start from num_hist observed frames (dinowm.models.interface)
        self.num_pred = num_pred
        self.concat_dim = concat_dim
        self.embedding_backend = embedding_backend
        self.visual_dim = encoder.emb_dim
        self.proprio_dim = proprio_encoder.emb_dim
        self.action_dim = action_encoder.emb_dim
        if concat_dim == 0 and not (self.proprio_dim == self.action_dim == self.visual_dim):
            raise ValueError(f"concat_dim 0: proprio/action embedding dims ({self.proprio_dim}, {self.action_dim}) "
                             f"must equal the visual width {self.visual_dim}")
        self.encoder.requires_grad_(False)

    # ------------------------------------------------------------------------------------------
    # latents
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_visual(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: (B, T, 3, S, S) in [-1, 1] -> frozen DINOv2 patch tokens (B, T, P, 384)."""
        b, t = obs.shape[:2]
        visual = self.encoder(obs.flatten(0, 1))  # (B*T, P, 384)
        return visual.unflatten(0, (b, t))  # (B, T, P, 384)

    def embed(self, visual: torch.Tensor, proprio: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """visual (B, T, P, 384), proprio (B, T, Dp), action (B, T, Da)
        -> z (B, T, P, 384 + Ep + Ea) (concat_dim 1) or (B, T, P + 2, 384) (concat_dim 0)."""
        if self.concat_dim == 1:
            return tiled_embedding(visual, proprio, action,
                                   self.proprio_encoder.weight, self.proprio_encoder.bias,
                                   self.action_encoder.weight, self.action_encoder.bias,
                                   backend=self.embedding_backend)
        proprio_tok = self.proprio_encoder(proprio)[:, :, None]  # (B, T, 1, 384)
        action_tok = self.action_encoder(action)[:, :, None]  # (B, T, 1, 384)
        return torch.cat([visual, proprio_tok.to(visual.dtype), action_tok.to(visual.dtype)], dim=2)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z -> (visual (B, T, P, 384), proprio (B, T, Ep), action (B, T, Ea)); proprio/action of patch 0."""
        if self.concat_dim == 1:
            v, p = self.visual_dim, self.proprio_dim
            return z[..., :v], z[:, :, 0, v:v + p], z[:, :, 0, v + p:]
        return z[:, :, :-2], z[:, :, -2], z[:, :, -1]

    def replace_action(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Overwrite the action part of z (B, T, ...) with the embedding of action (B, T, Da) (a new tensor)."""
        action_emb = self.action_encoder(action).to(z.dtype)  # (B, T, Ea)
        z = z.clone()
        if self.concat_dim == 1:
            z[..., -self.action_dim:] = action_emb[:, :, None, :]
        else:
            z[:, :, -1] = action_emb
        return z

    def predict(self, z_src: torch.Tensor) -> torch.Tensor:
        """z_src (B, F, P', D) -> predicted z (B, F, P', D); frame f predicts frame f + num_pred."""
        b, f = z_src.shape[:2]
        out = self.predictor(z_src.flatten(1, 2))  # (B, F*P', D)
        return out.unflatten(1, (f, -1))  # (B, F, P', D)

    def decode(self, z: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """z (B, T, P', D) -> images (B, T, 3, 16g, 16g), resized (bilinear, antialias) to size if given."""
        visual = self.split(z)[0]  # (B, T, P, 384)
        b, t, p, d = visual.shape
        g = int(round(p ** 0.5))
        assert g * g == p, f"decode: {p} patches are not a square grid"
        x = visual.reshape(b * t, g, g, d).permute(0, 3, 1, 2)  # (B*T, 384, g, g), patches row-major
        images = self.decoder(x)  # (B*T, 3, 16g, 16g)
        if size is not None and images.shape[-1] != size:
            # in fp32: the resize filter is more precise, and CPU has no bf16 antialiased bilinear kernel
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return images.unflatten(0, (b, t))  # (B, T, 3, S, S)

    # ------------------------------------------------------------------------------------------
    # training forward (docs/contract.md §7)
    # ------------------------------------------------------------------------------------------
    def forward(self, obs: torch.Tensor, proprio: torch.Tensor, action: torch.Tensor,
                visual: torch.Tensor | None = None, decode_prediction: bool = False, decoder_frames: int = 0,
                train_decoder: bool = True) -> dict:
        """obs (B, T, 3, S, S) in [-1, 1], proprio (B, T, Dp), action (B, T, Da), T = num_hist + num_pred;
        visual: optional cached encoder features (B, T, P, 384) (then the encoder is not run).
        decoder_frames, train_decoder: see `reconstruction` (training.decoder_frames / decoder_every_steps)."""
        t = obs.shape[1]
        if t != self.num_hist + self.num_pred:
            raise ValueError(f"forward: got {t} frames, expected num_hist + num_pred = {self.num_hist + self.num_pred}")
        size = obs.shape[-1]
        if visual is None:
            visual = self.encode_visual(obs)
        z = self.embed(visual, proprio, action)  # (B, T, P', D)
        z_src = z[:, :self.num_hist]
        z_tgt = z[:, self.num_pred:].detach()
        z_pred = self.predict(z_src)  # (B, num_hist, P', D)

        out = {}
        if self.concat_dim == 1:
            v, a = self.visual_dim, self.action_dim
            out["z_loss"] = F.mse_loss(z_pred[..., :-a], z_tgt[..., :-a])
            out["z_visual_loss"] = F.mse_loss(z_pred[..., :v], z_tgt[..., :v])
            out["z_proprio_loss"] = F.mse_loss(z_pred[..., v:-a], z_tgt[..., v:-a])
        else:
            out["z_loss"] = F.mse_loss(z_pred[:, :, :-1], z_tgt[:, :, :-1])
            out["z_visual_loss"] = F.mse_loss(z_pred[:, :, :-2], z_tgt[:, :, :-2])
            out["z_proprio_loss"] = F.mse_loss(z_pred[:, :, -2], z_tgt[:, :, -2])

        # the decoder trains on detached latents: it never reaches the predictor
        out.update(reconstruction(self, z, obs, decoder_frames, train_decoder, images=decode_prediction))
        out["loss"] = out["z_loss"] + out["decoder_recon_loss"] if "decoder_recon_loss" in out else out["z_loss"]
        if decode_prediction:  # logging/validation only (docs/contract.md §7): not trained on
            with torch.no_grad():
                pred_image = self.decode(z_pred.detach(), size)  # (B, num_hist, 3, S, S)
                out["decoder_pred_loss"] = F.mse_loss(pred_image, obs[:, self.num_pred:])
            out["pred_image"] = pred_image
        return out

    # ------------------------------------------------------------------------------------------
    # open-loop rollout (docs/contract.md §8)
    # ------------------------------------------------------------------------------------------
    def rollout(self, obs0: torch.Tensor, proprio0: torch.Tensor, actions: torch.Tensor,
                visual0: torch.Tensor | None = None) -> dict:
        """obs0 (B, num_hist, 3, S, S), proprio0 (B, >= num_hist, Dp), actions (B, num_hist + H, Da)
        -> {"z": (B, num_hist + H, P', D)}: the encoded context, then one predicted latent per further action.

        Each step predicts from the last num_hist latents, takes the last predicted frame and overwrites
        its action part with the embedding of the next real action. Decode with `decode(z, size)`.
        The last action is embedded into the last latent but not rolled past (the original predicts once
        more after it): every returned latent has a ground-truth frame to compare with.
        Differentiable with respect to the actions (gradient-based planning); wrap in `torch.no_grad()`
        for evaluation. Only the context
        frames' proprio is used (later proprio is predicted), so callers may pass every known frame's.
        """
        h0 = obs0.shape[1] if visual0 is None else visual0.shape[1]
        if visual0 is None:
            visual0 = self.encode_visual(obs0)
        z = self.embed(visual0, proprio0[:, :h0], actions[:, :h0])  # (B, h0, P', D)
        for t in range(h0, actions.shape[1]):
            z_new = self.predict(z[:, -self.num_hist:])[:, -1:]  # (B, 1, P', D)
            z_new = self.replace_action(z_new, actions[:, t:t + 1])
            z = torch.cat([z, z_new], dim=1)
        return {"z": z}

    def parameter_groups(self) -> dict:
        """Trainable parameters by optimiser group (docs/contract.md §9); the frozen encoder is excluded."""
        return {
            "predictor": [p for p in self.predictor.parameters() if p.requires_grad],
            "embeddings": [p for m in (self.action_encoder, self.proprio_encoder) for p in m.parameters()
                           if p.requires_grad],
            "decoder": [p for p in self.decoder.parameters() if p.requires_grad],
        }


def build_world_model(model_cfg, data_cfg, action_dim: int = 9):
    """The world model of a ModelConfig + DataConfig (either family). action_dim: raw action dims per step
    (Franka: 9)."""
    if model_cfg.predictor == "ac":
        from .ac_world_model import build_ac_world_model  # it builds on this module

        return build_ac_world_model(model_cfg, data_cfg, action_dim)
    encoder = build_encoder(model_cfg)
    grid = model_cfg.encoder_image_size // encoder.patch_size
    num_patches = grid * grid
    visual_dim = encoder.emb_dim
    proprio_encoder = ProprioceptiveEmbedding(data_cfg.proprio_end - data_cfg.proprio_start, model_cfg.proprio_emb_dim)
    action_encoder = ProprioceptiveEmbedding(action_dim * data_cfg.frameskip, model_cfg.action_emb_dim)
    if model_cfg.concat_dim == 1:
        dim, tokens = visual_dim + model_cfg.proprio_emb_dim + model_cfg.action_emb_dim, num_patches
    else:
        dim, tokens = visual_dim, num_patches + 2
    predictor = ViTPredictor(
        num_patches=tokens, num_frames=data_cfg.num_hist, dim=dim, depth=model_cfg.predictor_depth,
        heads=model_cfg.predictor_heads, dim_head=model_cfg.predictor_dim_head, mlp_dim=model_cfg.predictor_mlp_dim,
        dropout=model_cfg.predictor_dropout, emb_dropout=model_cfg.predictor_emb_dropout,
        attention_backend=model_cfg.attention_backend, layernorm_linear_backend=model_cfg.layernorm_linear_backend,
        pos_init_std=model_cfg.predictor_pos_init_std, zero_init_residual=model_cfg.predictor_zero_init_residual,
    )
    decoder = VQVAEDecoder(emb_dim=visual_dim)
    return VWorldModel(encoder, proprio_encoder, action_encoder, predictor, decoder,
                       num_hist=data_cfg.num_hist, num_pred=data_cfg.num_pred, concat_dim=model_cfg.concat_dim,
                       embedding_backend=model_cfg.embedding_backend)
