"""ModelConfig presets, validation, overrides and the reference JSON mapping."""

import json

import pytest

from gpt2_jax.config import ConfigError, FlagParser, ModelConfig, TrainConfig


def test_presets_have_gpt2_shapes():
    for name, (layers, heads, embd) in {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                                        "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}.items():
        cfg = ModelConfig.from_preset(name)
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (layers, heads, embd)
        assert (cfg.vocab_size, cfg.block_size, cfg.tie_embeddings, cfg.qkv_bias) == (50257, 1024, True, True)
        assert cfg.activation == "gelu_tanh" and cfg.layer_norm_eps == 1e-5


def parse(argv: list[str], *classes):
    parser = FlagParser()
    for cls in classes:
        parser.add_fields(cls)
    flags, positional = parser.parse(argv)
    return vars(flags), positional


def test_flags_are_typed_by_their_config_fields():
    flags, rest = parse(["--n_layer=3", "--dropout", "0.1", "--learning_rate=3e-4", "pos", "--qkv_bias"],
                        ModelConfig, TrainConfig)
    assert flags == {"n_layer": 3, "dropout": 0.1, "learning_rate": 3e-4, "qkv_bias": True} and rest == ["pos"]
    assert parse(["--qkv_bias=off", "--decay_embeddings=no"], ModelConfig, TrainConfig)[0] == {
        "qkv_bias": False, "decay_embeddings": False}
    cfg = ModelConfig.from_preset("tiny", n_layer=flags["n_layer"])
    assert cfg.n_layer == 3 and cfg.n_embd == 32
    with pytest.raises(ConfigError, match="unknown flag --n_layers; known flags: activation, attention, batch_size"):
        parse(["--n_layers=3"], ModelConfig, TrainConfig)
    with pytest.raises(ConfigError, match="unknown flag --n_lay;"):  # no abbreviations: --n_lay is not --n_layer
        parse(["--n_lay=3"], ModelConfig)
    with pytest.raises(ConfigError, match="argument --n_layer: must be int; got 'three'"):
        parse(["--n_layer=three"], ModelConfig)
    with pytest.raises(ConfigError, match="argument --qkv_bias: takes true or false; got 'maybe'"):
        parse(["--qkv_bias=maybe"], ModelConfig)
    with pytest.raises(ConfigError, match="argument --n_layer: expected one argument"):
        parse(["--n_layer"], ModelConfig)


def test_a_command_line_tool_prints_its_usage_and_exits_2_on_a_bad_flag(capsys):
    parser = FlagParser(prog="tool")
    parser.add_defaults({"steps": 3, "name": "x"})
    assert vars(parser.parse_args(["--steps=5"])) == {"steps": 5, "name": "x"}
    for argv, message in ((["--step=5"], "unknown flag --step; known flags: name, steps"),
                          (["--steps=five"], "argument --steps: must be int; got 'five'"),
                          (["extra"], "unexpected argument(s) ['extra']")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("usage: tool") and err.endswith(f"tool: error: {message}\n")


@pytest.mark.parametrize("overrides, message", [
    ({"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be divisible by n_head \(3\)"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"activation": "relu"}, "activation must be one of"),
    ({"n_layer": 0}, "n_layer must be a positive integer"),
    ({"n_layer": 2.5}, "n_layer must be int"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"n_layers": 2}, r"unknown ModelConfig key\(s\) \['n_layers'\]"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt3'"):
        ModelConfig.from_preset("gpt3")


def test_reference_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 50257, "context_length": 256, "emb_dim": 64, "n_heads": 4,
                                "n_layers": 3, "drop_rate": 0.1, "qkv_bias": True}))
    cfg = ModelConfig.from_reference_json(path)
    assert (cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.dropout) == (256, 64, 4, 3, 0.1)
    assert cfg.tie_embeddings is False and cfg.lm_head_bias is True and cfg.qkv_bias is True
    path.write_text(json.dumps({"vocab_size": 50257, "context_length": 256}))
    with pytest.raises(ConfigError, match="reference config lacks keys"):
        ModelConfig.from_reference_json(path)


def test_train_config_validation():
    with pytest.raises(ConfigError, match="lr_schedule must be"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="learning_rate and min_lr must fit in float32; got 1e\\+39"):
        TrainConfig(learning_rate=1e39)
