"""Train a DINO world model.

    python train.py --config demo.toml                       # simulated Franka demo, 2 CPU cores, ~10 min
    python train.py --config franka.toml --data.path /data/my_dset --model.encoder_weights dinov2_vits14_pretrain.pth
    python train.py --config franka.toml --training.batch_size 8 --training.dtype bf16 --out runs/bs8
    python train.py --resume runs/bs8 [--training.max_steps 1000]   # continue exactly where it stopped

A bare config name is looked up in configs/. Any value can be overridden with --section.key value
(see README "Configuration"). Without --out the run folder is outputs/<date>/<time>/.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dinowm.checkpoint import CheckpointError, load_checkpoint
from dinowm.config import Config, ConfigError, apply_values, config_from_dict, load_config, parse_overrides
from dinowm.trainer import Trainer


def write_config(cfg: Config, path: Path) -> None:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = repr(value).lower() if isinstance(value, bool) else (f'"{value}"' if isinstance(value, str) else repr(value))
            lines.append(f"{key} = {text}")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file, or a name in configs/ (e.g. franka.toml)")
    parser.add_argument("--out", help="run folder (default outputs/<date>/<time>)")
    parser.add_argument("--resume", help="run folder (or checkpoint file) to continue from")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        checkpoint = None
        if args.resume:
            if args.config:
                raise ConfigError("--resume continues a run with its saved config; change values with --section.key value instead of --config")
            checkpoint = load_checkpoint(args.resume)
            cfg = config_from_dict(checkpoint["config"])
            apply_values(cfg, parse_overrides(rest), "command line")
            cfg.validate()
            resume_dir = Path(args.resume)
            run_dir = Path(args.out) if args.out else (resume_dir if resume_dir.is_dir() else resume_dir.parent.parent)
        else:
            if not args.config:
                raise ConfigError("give --config FILE (e.g. --config demo.toml) or --resume RUN_DIR")
            cfg = load_config(args.config, rest)
            run_dir = Path(args.out) if args.out else Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    except (ConfigError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir / "config.toml")
    logging.getLogger().addHandler(logging.FileHandler(run_dir / "train.log"))
    logging.getLogger("dinowm").info("run folder: %s", run_dir)
    return Trainer(cfg, run_dir, checkpoint).fit()


if __name__ == "__main__":
    main(sys.argv[1:])
