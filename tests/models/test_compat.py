"""Importer of original DINO-WM checkpoints: a fixture pickled under the original class paths
(models.vit, models.vqvae, models.proprio), which are removed from sys.modules before importing."""
import enum
import sys
import types

import pytest
import torch
import torch.nn as nn

from dinowm.compat import CompatError, _infer, import_dino_wm_checkpoint, main
from crafted import Marker, write_raw_pickle
from dinowm.errors import run_cli
from dinowm.models.decoder import VQVAEDecoder
from dinowm.models.embeddings import ProprioceptiveEmbedding
from dinowm.models.predictor import ViTPredictor

NUM_PATCHES, NUM_FRAMES, DIM = 4, 3, 404


def _original_classes() -> dict:
    """Stand-ins of the original classes with the key layout of docs/contract.md §10 (our own code, same structure)."""

    class Attention(nn.Module):
        def __init__(self, dim, heads, dim_head, dropout):
            super().__init__()
            inner = heads * dim_head
            self.heads, self.scale = heads, dim_head ** -0.5
            self.norm = nn.LayerNorm(dim)
            self.attend = nn.Softmax(dim=-1)
            self.dropout = nn.Dropout(dropout)
            self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
            self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
            self.bias = torch.ones(1, 1, 12, 12).tril()  # a plain tensor attribute, as the original's mask

    class FeedForward(nn.Module):
        def __init__(self, dim, hidden, dropout):
            super().__init__()
            self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, dim), nn.Dropout(dropout))

    class Transformer(nn.Module):
        def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.layers = nn.ModuleList([nn.ModuleList([Attention(dim, heads, dim_head, dropout),
                                                        FeedForward(dim, mlp_dim, dropout)]) for _ in range(depth)])

    class ViTPredictor(nn.Module):
        def __init__(self, *, num_patches, num_frames, dim, depth, heads, mlp_dim, dim_head=64, dropout=0.0):
            super().__init__()
            self.pos_embedding = nn.Parameter(torch.randn(1, num_frames * num_patches, dim))
            self.dropout = nn.Dropout(0.0)
            self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
            self.pool = "cls"

    class Quantize(nn.Module):
        def __init__(self, dim, n_embed):
            super().__init__()
            embed = torch.randn(dim, n_embed)
            self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, 0.99, 1e-5
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.zeros(n_embed))
            self.register_buffer("embed_avg", embed.clone())

    class ResBlock(nn.Module):
        def __init__(self, in_channel, channel):
            super().__init__()
            self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(in_channel, channel, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(channel, in_channel, 1))

    class Decoder(nn.Module):
        def __init__(self, in_channel, out_channel, channel, n_res_block, n_res_channel):
            super().__init__()
            blocks = [nn.Conv2d(in_channel, channel, 3, padding=1)]
            blocks += [ResBlock(channel, n_res_channel) for _ in range(n_res_block)]
            blocks += [nn.ReLU(inplace=True), nn.ConvTranspose2d(channel, channel // 2, 4, stride=2, padding=1),
                       nn.ReLU(inplace=True), nn.ConvTranspose2d(channel // 2, out_channel, 4, stride=2, padding=1)]
            self.blocks = nn.Sequential(*blocks)

    class VQVAE(nn.Module):
        def __init__(self, channel, n_res_block, n_res_channel, emb_dim, n_embed):
            super().__init__()
            self.quantize = False
            self.quantize_b = Quantize(emb_dim, n_embed)
            self.upsample_b = Decoder(emb_dim, emb_dim, channel, n_res_block, n_res_channel)
            self.dec = Decoder(emb_dim, 3, channel, n_res_block, n_res_channel)
            self.info = f"channel: {channel}"

    class ProprioceptiveEmbedding(nn.Module):
        def __init__(self, num_frames=16, tubelet_size=1, in_chans=8, emb_dim=384, use_3d_pos=False):
            super().__init__()
            self.num_frames, self.tubelet_size, self.in_chans, self.emb_dim = num_frames, tubelet_size, in_chans, emb_dim
            self.patch_embed = nn.Conv1d(in_chans, emb_dim, kernel_size=tubelet_size, stride=tubelet_size)

    # the original wraps its optimisers with HF accelerate; stand-ins of those classes
    class DistributedType(str, enum.Enum):
        NO = "NO"
        MULTI_GPU = "MULTI_GPU"

    class AcceleratorState:
        def __init__(self):
            self.distributed_type, self.device, self.num_processes = DistributedType.NO, torch.device("cpu"), 1

    class AcceleratedOptimizer(torch.optim.Optimizer):
        def __init__(self, optimizer):  # noqa: super().__init__ deliberately not called, as accelerate
            self.optimizer, self.scaler, self.accelerator_state = optimizer, None, AcceleratorState()

        def __getstate__(self):
            return self.__dict__.copy()

    return {
        "accelerate.utils.dataclasses": [DistributedType],
        "accelerate.state": [AcceleratorState],
        "accelerate.optimizer": [AcceleratedOptimizer],
        "models.vit": [Attention, FeedForward, Transformer, ViTPredictor],
        "models.vqvae": [Quantize, ResBlock, Decoder, VQVAE],
        "models.proprio": [ProprioceptiveEmbedding],
    }


def _install(classes: dict) -> dict:
    """Put the stand-in modules into sys.modules; returns what they replaced."""
    names = ["models", "accelerate", "accelerate.utils"] + list(classes)
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for mod_name, clss in classes.items():
        for cls in clss:
            cls.__module__, cls.__qualname__ = mod_name, cls.__name__
            setattr(sys.modules[mod_name], cls.__name__, cls)
    return saved


def _uninstall(saved: dict) -> None:
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original-format checkpoint (dict of whole pickled modules + optimisers) and its state dicts."""
    classes = _original_classes()
    saved = _install(classes)
    try:
        mods = {c.__name__: c for cs in classes.values() for c in cs}
        predictor = mods["ViTPredictor"](num_patches=NUM_PATCHES, num_frames=NUM_FRAMES, dim=DIM, depth=2,
                                         heads=4, mlp_dim=64, dim_head=16, dropout=0.1)
        decoder = mods["VQVAE"](channel=16, n_res_block=2, n_res_channel=4, emb_dim=384, n_embed=8)
        action_encoder = mods["ProprioceptiveEmbedding"](num_frames=3, in_chans=45, emb_dim=10)
        proprio_encoder = mods["ProprioceptiveEmbedding"](num_frames=3, in_chans=3, emb_dim=10)
        predictor_opt = torch.optim.AdamW(list(predictor.parameters()) + list(action_encoder.parameters())
                                          + list(proprio_encoder.parameters()), lr=5e-4)
        decoder_opt = torch.optim.Adam(decoder.parameters(), lr=3e-4)
        for opt, m in ((predictor_opt, predictor), (decoder_opt, decoder)):
            sum(p.sum() for p in m.parameters()).backward()
            opt.step()
        predictor_opt = mods["AcceleratedOptimizer"](predictor_opt)
        ckpt = {"epoch": 7, "predictor": predictor, "predictor_optimizer": predictor_opt, "decoder": decoder,
                "decoder_optimizer": decoder_opt, "action_encoder": action_encoder,
                "proprio_encoder": proprio_encoder}
        path = tmp_path_factory.mktemp("orig") / "model_latest.pth"
        torch.save(ckpt, path)
        torch.save(ckpt, path.with_name("model_legacy.pth"), _use_new_zipfile_serialization=False)
        states = {k: {n: t.detach().clone() for n, t in ckpt[k].state_dict().items()}
                  for k in ("predictor", "decoder", "action_encoder", "proprio_encoder")}
    finally:
        _uninstall(saved)
    return path, states


def test_import_without_original_code(original):
    path, states = original
    assert "models" not in sys.modules and "models.vit" not in sys.modules
    ckpt = import_dino_wm_checkpoint(path, num_frames=NUM_FRAMES)
    assert "models.vit" not in sys.modules
    assert ckpt["format"] == "dinowm/1" and ckpt["epoch"] == 7 and ckpt["source"] == str(path)
    expected = {f"{entry}.{k}": v for entry, sd in states.items() for k, v in sd.items()}
    assert set(ckpt["model"]) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ckpt["model"][k], v), k
    assert not any(k.endswith(".bias") and "to_qkv" in k for k in ckpt["model"])
    assert ckpt["inferred"] == {
        "num_patches": 4, "num_frames": 3, "dim": 404, "action_in": 45, "proprio_in": 3, "action_emb_dim": 10,
        "proprio_emb_dim": 10, "concat_dim": 1, "depth": 2, "inner_dim": 64, "mlp_dim": 64, "decoder_n_embed": 8}


def test_loaded_weights_equal_ours(original):
    path, states = original
    model = nn.Module()
    model.predictor = ViTPredictor(NUM_PATCHES, NUM_FRAMES, dim=DIM, depth=2, heads=4, dim_head=16, mlp_dim=64)
    model.decoder = VQVAEDecoder(emb_dim=384, channel=16, n_res_block=2, n_res_channel=4, n_embed=8)
    model.action_encoder = ProprioceptiveEmbedding(45, 10)
    model.proprio_encoder = ProprioceptiveEmbedding(3, 10)
    model.encoder = nn.Linear(2, 2)  # our encoder is not in original checkpoints
    result = model.load_state_dict(import_dino_wm_checkpoint(path, num_frames=NUM_FRAMES)["model"], strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"encoder.weight", "encoder.bias"}
    for entry, sd in states.items():
        ours = getattr(model, entry).state_dict()
        assert set(ours) == set(sd)
        assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_cli_writes_atomically(original, tmp_path, capsys):
    path, _ = original
    out = tmp_path / "sub" / "converted.pt"
    assert main(["import-dino-wm", str(path), "--out", str(out), "--num-frames", str(NUM_FRAMES)]) == 0
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == "dinowm/1" and ckpt["epoch"] == 7
    assert "epoch 7" in capsys.readouterr().out


def test_legacy_serialisation_format_imports_the_same(original):
    path, _ = original
    zipped = import_dino_wm_checkpoint(path, num_frames=NUM_FRAMES)["model"]
    legacy = import_dino_wm_checkpoint(path.with_name("model_legacy.pth"), num_frames=NUM_FRAMES)["model"]
    assert set(zipped) == set(legacy) and all(torch.equal(zipped[k], legacy[k]) for k in zipped)


@pytest.mark.parametrize("how", ["zip", "legacy", "legacy-header"])
def test_crafted_checkpoint_runs_no_code(tmp_path, how):
    marker, path = tmp_path / "marker", tmp_path / "crafted.pth"
    if how == "legacy-header":  # the first record of a legacy file (its magic number) is itself the payload
        write_raw_pickle(path, marker)
    else:
        torch.save({"epoch": 1, "predictor": Marker(marker), "action_encoder": 0, "proprio_encoder": 0}, path,
                   _use_new_zipfile_serialization=how == "zip")
    with pytest.raises(CompatError, match=r"crafted\.pth: unknown class 'io\.open'"):
        import_dino_wm_checkpoint(path)
    assert not marker.exists()


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_errors_name_the_file(original, tmp_path, capsys):
    bad = tmp_path / "not_a_ckpt.pth"
    bad.write_bytes(b"hello")
    with pytest.raises(CompatError, match=r"not_a_ckpt\.pth: not a DINO-WM checkpoint"):
        import_dino_wm_checkpoint(bad)
    torch.save({"epoch": 1, "predictor": nn.Linear(2, 2)}, tmp_path / "partial.pth")
    with pytest.raises(CompatError, match=r"partial\.pth: .*missing entries action_encoder, proprio_encoder"):
        import_dino_wm_checkpoint(tmp_path / "partial.pth")
    torch.save({"epoch": 1, "predictor": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CompatError, match=r"evil\.pth: unknown class 'builtins\.print'"):
        import_dino_wm_checkpoint(tmp_path / "evil.pth")
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(CompatError, match=r"missing\.pth: no such file"):
        import_dino_wm_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CompatError, match=r"--num-frames 0 must be >= 1"):
        import_dino_wm_checkpoint(original[0], num_frames=0)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["import-dino-wm", str(bad), "--out", str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not_a_ckpt.pth" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_unknown_original_class_is_named(tmp_path):
    mod = types.ModuleType("models.foo")

    class Bar(nn.Module):
        pass

    Bar.__module__, Bar.__qualname__ = "models.foo", "Bar"
    mod.Bar = Bar
    sys.modules["models.foo"] = mod
    try:
        torch.save({"epoch": 1, "predictor": Bar(), "action_encoder": 0, "proprio_encoder": 0}, tmp_path / "m.pth")
    finally:
        sys.modules.pop("models.foo")
    with pytest.raises(CompatError, match=r"m\.pth: unknown class 'models\.foo\.Bar'"):
        import_dino_wm_checkpoint(tmp_path / "m.pth")
    # allowed: unpickled as an inert stand-in; then its entries are not the expected modules
    with pytest.raises(CompatError, match=r"m\.pth: entry 'action_encoder' is a int, not a pickled module"):
        import_dino_wm_checkpoint(tmp_path / "m.pth", allow_classes=["models.foo."])


@pytest.mark.parametrize("tokens, frames, patches", [(588, 3, 196), (768, 3, 256), (784, 4, 196)])
def test_frame_count_inferred_from_the_encoder_grids(tokens, frames, patches):
    model = {"predictor.pos_embedding": torch.zeros(1, tokens, 404),
             "action_encoder.patch_embed.weight": torch.zeros(10, 45, 1),
             "proprio_encoder.patch_embed.weight": torch.zeros(10, 3, 1)}
    inferred = _infer(model, None)
    assert (inferred["num_frames"], inferred["num_patches"]) == (frames, patches)


def test_ambiguous_frame_count_is_an_error_not_a_guess():
    model = {"predictor.pos_embedding": torch.zeros(1, 12, 404),  # 3 x 4, 4 x 3, 12 x 1, ... none a known grid
             "action_encoder.patch_embed.weight": torch.zeros(10, 45, 1),
             "proprio_encoder.patch_embed.weight": torch.zeros(10, 3, 1)}
    with pytest.raises(ValueError, match="pass --num-frames"):
        _infer(model, None)
    assert _infer(model, 3)["num_patches"] == 4


class _ScriptedWriter(torch.nn.Module):
    """Its TorchScript __setstate__ would write `self.target` when the archive is loaded."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return self.target, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        torch.save(torch.zeros(1), self.target)


def test_a_torchscript_archive_is_refused_before_its_code_runs(tmp_path):
    """torch.load(weights_only=False) hands such a zip to torch.jit.load, past the restricted unpickler, and
    the archive's __setstate__ runs (it writes the marker; checked by hand with torch 2.13)."""
    marker, path = tmp_path / "marker.pt", tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.script(_ScriptedWriter(str(marker))), path)
    assert marker.exists() is False
    with pytest.raises(CompatError, match=r"scripted\.pth: a TorchScript archive.*refusing"):
        import_dino_wm_checkpoint(path)
    assert not marker.exists()
