"""Decoder reconstruction quality vs training.decoder_frames / decoder_every_steps, at equal optimiser steps.

    python -m bench.decoder_quality --steps 48 --data.path data/demo     # demo.toml's data (generated if absent)

The decoder trains on detached encoder latents and never reaches the predictor, so its quality under
these options is measured by training the decoder alone, exactly as the training step does
(`dinowm.models.world_model.reconstruction`, Adam at optim.decoder_lr, the run's autocast), on the same
batches for every variant. Reported per variant: the seconds per step of the decoder's part and the
validation reconstruction MSE / PSNR (images in [-1, 1]: PSNR = 10 log10(4 / MSE)) over every frame.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from dinowm import perf
from dinowm.config import load_config
from dinowm.data import build_data, make_loader, preprocess_images
from dinowm.models.world_model import build_world_model, reconstruction


def batches(model, windows, cfg, count, seed):
    loader = make_loader(windows, cfg.training.batch_size, shuffle=True, seed=seed, drop_last=True)
    out = []
    while len(out) < count:
        for batch in loader:
            obs = preprocess_images(batch["obs"], cfg.data.img_size)
            visual = model.encode_visual(obs)
            out.append((model.embed(visual, batch["proprio"], batch["action"]).detach(), obs))
            if len(out) == count:
                break
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo.toml")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--variants", default="0:1,1:1,0:4", help="decoder_frames:decoder_every_steps,...")
    args, overrides = parser.parse_known_args(argv)  # the rest: --section.key value overrides of the config
    cfg = load_config(args.config, overrides)
    torch.manual_seed(cfg.training.seed)
    data = build_data(cfg.data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_world_model(cfg.model, cfg.data, action_dim=int(data.dataset.actions.shape[-1]))
    dtype = torch.bfloat16 if cfg.training.dtype == "bf16" else torch.float32
    perf.configure(model, torch.device("cpu"), dtype)
    initial = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        train = batches(model, data.train, cfg, args.steps, cfg.training.seed)
        val = batches(model, data.val, cfg, cfg.eval.max_batches, cfg.training.seed + 1)
    print(f"{args.config}: {args.steps} steps of batch {cfg.training.batch_size}, {cfg.training.dtype}")
    print("| decoder_frames | decoder_every_steps | decoder s / step | val recon MSE | val PSNR (dB) |")
    print("|---|---|---|---|---|")
    for variant in args.variants.split(","):
        k, n = (int(x) for x in variant.split(":"))
        model.decoder.load_state_dict(initial)
        torch.manual_seed(cfg.training.seed)
        opt = torch.optim.Adam(model.decoder.parameters(), lr=cfg.optim.decoder_lr)
        start = time.perf_counter()
        for step, (z, obs) in enumerate(train):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = reconstruction(model, z, obs, frames=k, train=step % n == 0)
            if "decoder_recon_loss" in out:
                out["decoder_recon_loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        seconds = (time.perf_counter() - start) / len(train)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            mse = sum(float(reconstruction(model, z, obs)["decoder_recon_loss"]) for z, obs in val) / len(val)
        print(f"| {k or 'all'} | {n} | {seconds:.2f} | {mse:.4f} | {10 * math.log10(4 / mse):.2f} |", flush=True)


if __name__ == "__main__":
    main()
