"""Importer of official V-JEPA 2-AC predictor checkpoints: official keys load strictly, wrappers and DDP
prefixes are handled, missing/unexpected keys are listed, no code in the file runs."""
import argparse

import pytest
import torch

from dinowm.compat import CompatError, import_vjepa2_ac_checkpoint, main
from dinowm.models.ac_predictor import ACPredictor


def official_state():
    p = ACPredictor(visual_dim=32, action_dim=7, state_dim=7, grid=(2, 2), dim=48, depth=3, heads=2)
    return p.state_dict()


def test_wrapped_ddp_checkpoint_with_extrinsics_loads_strictly(tmp_path):
    state = official_state()
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["module.extrinsics_encoder.weight"] = torch.randn(48, 6)
    wrapped["module.extrinsics_encoder.bias"] = torch.randn(48)
    path = tmp_path / "vjepa2-ac.pt"
    torch.save({"predictor": wrapped, "encoder": {"module.blocks.0.w": torch.randn(2)}, "epoch": 3,
                "opt": {"lr": 1e-4}}, path)
    ckpt = import_vjepa2_ac_checkpoint(path)
    assert ckpt["inferred"] == {"visual_dim": 32, "dim": 48, "depth": 3, "mlp_hidden": 192, "action_dim": 7,
                                "state_dim": 7}
    assert set(ckpt["model"]) == {f"predictor.{k}" for k in state}
    assert all(torch.equal(ckpt["model"][f"predictor.{k}"], v) for k, v in state.items())
    assert any("extrinsics_encoder" in n for n in ckpt["notes"]) and any("rope_legacy" in n for n in ckpt["notes"])
    fresh = ACPredictor(visual_dim=32, action_dim=7, state_dim=7, grid=(2, 2), dim=48, depth=3, heads=2)
    fresh.load_state_dict({k.removeprefix("predictor."): v for k, v in ckpt["model"].items()}, strict=True)


def test_plain_state_dict_and_cli(tmp_path, capsys):
    path, out = tmp_path / "sd.pt", tmp_path / "converted.pt"
    torch.save(official_state(), path)
    assert main(["import-vjepa2-ac", str(path), "--out", str(out)]) == 0
    assert "rope_legacy" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["format"] == "dinowm/1"


@pytest.mark.parametrize("change,match", [
    (lambda s: s.pop("predictor_blocks.1.mlp.fc2.bias"), r"missing \['predictor_blocks\.1\.mlp\.fc2\.bias'\]"),
    (lambda s: s.__setitem__("predictor_blocks.0.attn.q_norm.weight", torch.ones(24)),
     r"unexpected \['predictor_blocks\.0\.attn\.q_norm\.weight'\]"),
    (lambda s: s.__setitem__("predictor_norm.weight", torch.ones(47)), r"wrong shapes \['predictor_norm\.weight"),
])
def test_key_mismatch_is_an_error_listing_the_keys(tmp_path, change, match):
    state = official_state()
    change(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CompatError, match=match) as e:
        import_vjepa2_ac_checkpoint(path)
    assert "\n" not in str(e.value)


def test_files_with_code_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"predictor": official_state(), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CompatError, match="tensors only"):
        import_vjepa2_ac_checkpoint(path)
    torch.save({"encoder": {"w": torch.ones(1)}}, path)
    with pytest.raises(CompatError, match="'predictor'"):
        import_vjepa2_ac_checkpoint(path)
