"""Train a DINO world model.

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
from dinowm.cli import main

if __name__ == "__main__":
    main()
