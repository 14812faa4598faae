"""Train a world model, DINO-WM or the V-JEPA 2-AC predictor (`python train.py ...`, or the
`dinowm-train` console script).

    python train.py --config demo.toml                       # simulated Franka demo, 2 CPU cores, ~10 min
    python train.py --config franka.toml --data.path /data/my_dset --model.encoder_weights dinov2_vits14_pretrain.pth
    python train.py --config franka.toml --training.batch_size 8 --training.dtype bf16 --out runs/bs8
    python train.py --resume runs/bs8 [--training.max_steps 1000]   # continue exactly where it stopped
    python train.py --config franka.toml --init-from converted.pt   # start from imported original weights
    torchrun --nproc_per_node 4 train.py --config franka.toml --out runs/ddp   # 4 GPUs, same global batch
    python train.py --config demo_ac.toml                    # the V-JEPA 2-AC predictor on the demo, ~10 min
    python train.py --config demo_ac.toml --inspect          # every stage of one batch's forward, then exit

A bare config name is looked up in configs/. Any value can be overridden with --section.key value
(see README "Configuration"). Without --out the run folder is outputs/<date>/<time>/.
Exit codes: 0 done, 2 a user error (one line), 130 Ctrl-C / 143 SIGTERM (a checkpoint was saved: resume),
124 hang (stacks in train.log).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from dinowm import distributed
from dinowm.checkpoint import check_resumable, load_checkpoint
from dinowm.config import Config, ConfigError, apply_values, config_from_dict, load_config, parse_overrides
from dinowm.data import is_dataset_dir
from dinowm.errors import UserError, one_line, run_cli
from dinowm.trainer import Trainer


def write_config(cfg: Config, path: Path) -> None:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = repr(value).lower() if isinstance(value, bool) else json.dumps(value)  # JSON strings are TOML strings
            lines.append(f"{key} = {text}")
        lines.append("")
    path.write_text("\n".join(lines))


# Settings a resumed run may change; the rest define the run (model, data, samples per batch) and may not.
# data.path and model.encoder_weights may move: the checkpoint's fingerprints check their contents.
RESUME_MAY_CHANGE = {"data.path", "data.num_workers", "data.demo_episodes", "data.demo_frames",
                     "model.encoder_weights", "training.epochs", "training.max_steps", "training.device",
                     "training.compile", "training.hang_timeout_s", "training.max_nonfinite_steps"}


def check_resume_changes(saved: Config, new: Config) -> None:
    for section in ("data", "model", "training"):
        old_values, new_values = getattr(saved, section).__dict__, getattr(new, section).__dict__
        for key, value in new_values.items():
            if value != old_values[key] and f"{section}.{key}" not in RESUME_MAY_CHANGE:
                raise ConfigError(f"--resume: {section}.{key} cannot change from {old_values[key]!r} to {value!r} "
                                  f"in a resumed run (start a new run, or --init-from its checkpoint)")


def check_demo_path(cfg: Config, overrides: dict) -> None:
    """A mistyped --data.path with a demo config (data.demo_episodes > 0) must not quietly generate a
    fresh demo dataset there and train on it: a command-line data.path that holds no dataset generates
    one only when --data.demo_episodes is given as well."""
    data = overrides.get("data", {})
    if cfg.data.demo_episodes > 0 and "path" in data and "demo_episodes" not in data \
            and not is_dataset_dir(Path(cfg.data.path).expanduser()):
        raise ConfigError(f"--data.path {cfg.data.path}: no dataset there (no states.pth); check the path. To "
                          f"generate a demo dataset at that path, add --data.demo_episodes {cfg.data.demo_episodes}")


def train(argv: list[str]) -> dict:
    """The command line of train.py -> the last logged metrics. User errors raise UserError subclasses."""
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file, or a name in configs/ (e.g. franka.toml)")
    parser.add_argument("--out", help="run folder (default outputs/<date>/<time>)")
    parser.add_argument("--resume", help="run folder (or checkpoint file) to continue from")
    parser.add_argument("--init-from", help="start a new run from the model weights of this checkpoint "
                                            "(e.g. one converted with `python -m dinowm.compat import-dino-wm`)")
    parser.add_argument("--inspect", action="store_true", help="print every stage of the forward (shape, min, max, "
                                                                   "mean, std) for one real training batch, then exit")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    checkpoint = None
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its saved config; change values with --section.key value instead of --config")
        if args.init_from:
            raise ConfigError("--resume and --init-from exclude each other: --resume continues a run, "
                              "--init-from starts a new one from given weights")
        checkpoint = load_checkpoint(args.resume)
        check_resumable(checkpoint, args.resume)
        cfg = config_from_dict(checkpoint["config"])
        overrides = parse_overrides(rest)
        apply_values(cfg, overrides, "command line")
        cfg.validate()
        check_resume_changes(config_from_dict(checkpoint["config"]), cfg)
        resume_dir = Path(args.resume)
        run_dir = Path(args.out) if args.out else (resume_dir if resume_dir.is_dir() else resume_dir.parent.parent)
    else:
        if not args.config:
            raise ConfigError("give --config FILE (e.g. --config demo.toml) or --resume RUN_DIR")
        overrides = parse_overrides(rest)
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    check_demo_path(cfg, overrides)
    rank = distributed.init_distributed(cfg.training.device)  # under torchrun: join the process group
    run_dir = Path(distributed.broadcast_object(str(run_dir)))  # rank 0's (time-stamped) folder
    root = logging.getLogger()
    log_file = None
    if rank.main:  # rank 0 alone writes files; the other ranks log warnings only
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run_dir / "config.toml")
        log_file = logging.FileHandler(run_dir / "train.log")
        root.addHandler(log_file)
        logging.captureWarnings(True)  # warnings (e.g. episodes too short for a sample) reach train.log too
    else:
        root.setLevel(logging.WARNING)
    try:
        logging.getLogger("dinowm").info("run folder: %s (%d processes)", run_dir, rank.world_size)
        init_weights = None
        if args.init_from:
            init_weights = load_checkpoint(args.init_from)["model"]
        if args.inspect:  # the encoder runs in the inspected forward: no feature cache needed
            cfg.training.feature_cache = False
        trainer = Trainer(cfg, run_dir, checkpoint, init_weights=init_weights)
        return trainer.inspect() if args.inspect else trainer.fit()
    except (UserError, OSError) as e:  # the run folder keeps the reason; run_cli prints it
        if log_file is not None:
            log_file.handle(logging.makeLogRecord({"name": "dinowm", "levelno": logging.ERROR, "levelname": "ERROR",
                                                   "msg": "error: %s", "args": (one_line(e),)}))
        raise
    finally:
        distributed.shutdown()
        if log_file is not None:
            logging.captureWarnings(False)
            root.removeHandler(log_file)
            log_file.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of train.py and the `dinowm-train` console script: user errors are one line, exit 2."""
    run_cli(train, argv)
