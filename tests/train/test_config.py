import pytest

from dinowm.config import CONFIG_DIR, ConfigError, config_from_dict, load_config, parse_overrides


def test_defaults_validate():
    cfg = load_config()
    assert cfg.data.frameskip == 5 and cfg.data.num_hist == 3 and cfg.training.batch_size == 32


def test_franka_toml_is_the_users_setup():
    cfg = load_config("franka.toml")  # bare name: looked up in configs/
    assert (cfg.data.frameskip, cfg.data.num_hist, cfg.data.num_pred) == (5, 3, 1)
    assert (cfg.data.img_size, cfg.model.encoder_image_size) == (224, 224)  # 16x16 = 256 patches
    assert (cfg.training.batch_size, cfg.training.epochs) == (32, 100)
    assert (cfg.optim.predictor_lr, cfg.optim.embedding_lr, cfg.optim.decoder_lr) == (5e-4, 5e-4, 3e-4)


def test_every_shipped_config_loads():
    for path in CONFIG_DIR.glob("*.toml"):
        load_config(path)


def test_overrides_take_precedence_and_are_coerced():
    cfg = load_config("franka.toml", ["--data.frameskip", "3", "--training.compile=true", "--optim.decoder_lr", "1e-4"])
    assert cfg.data.frameskip == 3 and cfg.training.compile is True and cfg.optim.decoder_lr == 1e-4


@pytest.mark.parametrize("args, message", [
    (["--data.framskip", "3"], "did you mean 'frameskip'"),
    (["--trainng.epochs", "3"], "did you mean 'training'"),
    (["--training.batch_size", "many"], "training.batch_size = 'many' is not a valid int"),
    (["--model.attention_backend", "flash2"], "model.attention_backend"),
    (["--data.num_pred", "4"], "data.num_pred"),
    (["--training.epochs"], "needs a value"),
    (["epochs=3"], "expected --section.key value"),
    (["--optim.predictor_lr", "inf"], "optim.predictor_lr = 'inf' is not a valid float"),
    (["--training.grad_clip", "nan"], "training.grad_clip = 'nan' is not a valid float"),
    (["--data.img_size", "0"], "data.img_size"),
    (["--training.device", "cudax"], "training.device"),
    (["--model.encoder", "vitb14", "--model.concat_dim", "0", "--model.action_emb_dim", "384",
      "--model.proprio_emb_dim", "384"], "must both be the vitb14 encoder's width 768"),
])
def test_bad_values_give_one_clear_error(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, args)


def test_unknown_key_in_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\nframe_skip = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key data.frame_skip \(did you mean 'frameskip'\?\)"):
        load_config(path)


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[data]\npath = 'Daten/Würfel'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: invalid TOML"):
        load_config(path)


def test_missing_config_file_lists_known_configs():
    with pytest.raises(ConfigError, match="franka.toml"):
        load_config("no_such_config")


def test_round_trip_through_dict():
    cfg = load_config("demo.toml", ["--training.max_steps", "7"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c.d=x"]) == {"a": {"b": "1"}, "c": {"d": "x"}}
