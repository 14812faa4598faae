"""training.decoder_every_steps through the trainer: the decoder is updated on every n-th step only, the
predictor on every step."""
import torch

from dinowm.checkpoint import load_checkpoint
from dinowm.cli import train
from franka_fixtures import write_franka_dataset
from test_trainer import TINY


def test_decoder_every_steps_updates_the_decoder_on_every_nth_step_only(tmp_path):
    dataset = write_franka_dataset(tmp_path / "dset", lengths=(20, 16, 24, 18, 22), hw=(32, 32))
    run = tmp_path / "run"
    train(["--config", "demo.toml", "--data.path", str(dataset), "--data.demo_episodes", "0", "--out", str(run),
           *TINY, "--training.decoder_every_steps", "2", "--training.decoder_frames", "1",
           "--training.max_steps", "1", "--eval.rollout_horizon", "0"])
    states = [load_checkpoint(run)["model"]]
    for steps in (2, 3):  # step indices 1 (no decoder) and 2 (decoder)
        train(["--resume", str(run), "--training.max_steps", str(steps)])
        states.append(load_checkpoint(run)["model"])

    def changed(prefix, a, b):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and "quantize" not in k)

    assert changed("predictor.", states[0], states[1]) and changed("predictor.", states[1], states[2])
    assert not changed("decoder.", states[0], states[1])
    assert changed("decoder.", states[1], states[2])
