"""Train a world model: `python train.py --config demo.toml`. Usage, examples and exit codes:
`python train.py --help` (the command lives in dinowm/cli.py, also installed as `dinowm-train`)."""
from dinowm.cli import main

if __name__ == "__main__":
    main()
