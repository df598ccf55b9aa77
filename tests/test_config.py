"""Config loading: one schema checks every key at load, each message names the key and source."""
import pytest

from mpifc.config import DEFAULTS, ConfigError, load_config, loads_config, preset_names, to_toml


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_default_key_has_one_schema_entry():
    from mpifc.config import SCHEMA

    assert sorted(_leaves(DEFAULTS)) == sorted(SCHEMA)
    assert all(spec.doc for spec in SCHEMA.values())


@pytest.mark.parametrize("name", preset_names())
def test_presets_load_and_round_trip_through_toml(name):
    from mpifc.models import LAYERS

    if name == "text-bow" and "embeddingbag" not in LAYERS:     # issue 13 part 3 not merged
        pytest.skip("text-bow needs the embeddingbag layer type (issue 13 part 3)")
    cfg = load_config(name)
    again = loads_config(to_toml(cfg))
    assert again == cfg


@pytest.mark.parametrize("item,words", [
    ("train.epochs=true", "train.epochs must be an integer >= 1, got true"),
    ("train.epochs=2.5", "train.epochs must be an integer >= 1, got 2.5"),
    ("train.max_steps=-1", "train.max_steps must be an integer >= 0"),
    ("train.keep_last=-1", "train.keep_last must be an integer >= 0"),
    ("optim.momentum=abc", "optim.momentum must be a number in [0, 1), got 'abc'"),
    ("optim.momentum=1.5", "optim.momentum must be a number in [0, 1), got 1.5"),
    ("optim.weight_decay=abc", "optim.weight_decay must be a number >= 0"),
    ("optim.weight_decay=nan", "optim.weight_decay must be a number >= 0, got nan"),
    ("optim.lr=inf", "optim.lr must be a number > 0, got inf"),
    ("parallel.bucket_mb=abc", "parallel.bucket_mb must be a number >= 0"),
    ("parallel.overlap=1", "parallel.overlap must be true or false, got 1"),
    ("train.checkpoint_every=abc", "train.checkpoint_every must be an integer >= 0"),
    ("train.max_steps=abc", "train.max_steps must be an integer >= 0"),
    ("train.dtype=float16", "train.dtype must be one of float32, float64, got 'float16'"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 numbers in [0, 1)"),
    ("schedule.factor=1.0", "schedule.factor must be a number in (0, 1)"),
    ("seed=-3", "seed must be an integer >= 0"),
    ("model.input=[3,0,8]", "model.input must be a non-empty list of integers >= 1"),
    ("train.out=\"runs/{nme}\"", "train.out"),
])
def test_bad_value_from_set_names_key_and_origin(item, words):
    with pytest.raises(ConfigError) as e:
        load_config("digits-mlp", [item])
    msg = str(e.value)
    assert words in msg
    assert f"--set {item}" in msg
    assert "\n" not in msg


def test_bad_value_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "my.toml"
    f.write_text(to_toml(load_config("digits-mlp")).replace("epochs = 15", "epochs = true"))
    with pytest.raises(ConfigError, match=r"my\.toml: train\.epochs must be an integer >= 1, got true"):
        load_config(str(f))


def test_several_problems_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("digits-mlp", ["train.epochs=0", "optim.lr=-1"])
    msg = str(e.value)
    assert "train.epochs" in msg and "optim.lr" in msg and "\n" not in msg


def test_numbers_keep_their_meaning():
    """An integer where a float is expected is fine; the float keys come back as floats."""
    cfg = load_config("digits-mlp", ["optim.lr=1", "parallel.bucket_mb=4", "optim.momentum=0"])
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    assert isinstance(cfg["parallel"]["bucket_mb"], float)


def test_binary_file_is_a_config_error(tmp_path):
    f = tmp_path / "weights.toml"
    f.write_bytes(b"\x89HDF\r\n\x1a\n\x00\xff\xfe" * 10)
    with pytest.raises(ConfigError, match=r"weights\.toml: not a UTF-8 text file"):
        load_config(str(f))


def test_unparseable_set_value_is_one_clear_line():
    with pytest.raises(ConfigError) as e:
        load_config("digits-mlp", ["model.input=[3,"])
    msg = str(e.value)
    assert "--set model.input=[3," in msg and "not a valid TOML value" in msg
    assert "\n" not in msg


def test_min_lr_above_lr_is_refused():
    with pytest.raises(ConfigError, match=r"schedule\.min_lr \(0\.1\) must not exceed optim\.lr"):
        load_config("digits-cnn", ["schedule.min_lr=0.1", "optim.lr=0.01"])
    load_config("digits-mlp", ["schedule.min_lr=0.1", "optim.lr=0.01"])  # no schedule: unused


# ---------------------------------------------------------------- the layer table
def _layers(tmp_path, layers_toml):
    f = tmp_path / "net.toml"
    f.write_text(f'[model]\ninput = [64]\nlayers = {layers_toml}\n')
    return str(f)


@pytest.mark.parametrize("layers,words", [
    ('"conv"', "model.layers must be a list of tables"),
    ("5", "model.layers must be a list of tables"),
    ("[1, 2]", "model.layers[0] must be a table"),
    ('[{out = 10}]', "model.layers[0] must be a table with a 'type'"),
    ('[{type = "linaer", out = 10}]', "model.layers[0]: unknown type 'linaer'; known: "),
    ('[{type = "linear", out = 10, shrad = "row"}]', "model.layers[0] (linear): unknown keys ['shrad']"),
    ('[{type = "linear", out = "ten"}]', "model.layers[0] (linear): 'out' must be an integer >= 1"),
    ('[{type = "linear", out = 10, bias = "yes"}]', "model.layers[0] (linear): 'bias' must be true or false"),
    ('[{type = "linear", out = 10, shard = "rows"}]', "model.layers[0] (linear): 'shard' must be one of"),
    ('[{type = "linear", out = 10, init = "zeros"}]', "model.layers[0] (linear): 'init' must be one of"),
    ('[{type = "dropout", p = 1.5}, {type = "linear", out = 10}]',
     "model.layers[0] (dropout): 'p' must be a number in [0, 1)"),
    ('[{type = "relu"}]', "the last layer with parameters must be a linear layer"),
    ("[]", "model.layers is empty"),
])
def test_bad_layer_table_is_refused_at_load(tmp_path, layers, words):
    path = _layers(tmp_path, layers)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert words in msg and "net.toml" in msg and "\n" not in msg


def test_unknown_layer_type_lists_the_known_ones(tmp_path):
    from mpifc.models import LAYERS

    with pytest.raises(ConfigError) as e:
        load_config(_layers(tmp_path, '[{type = "flatten"}, {type = "lstm"}, {type = "linear", out = 3}]'))
    assert "model.layers[1]: unknown type 'lstm'" in str(e.value)
    assert all(t in str(e.value) for t in LAYERS)


def test_good_layer_table_loads(tmp_path):
    load_config(_layers(tmp_path, '[{type = "linear", out = 32, shard = "column", init = "xavier_uniform"},'
                                  ' {type = "dropout", p = 0.1}, {type = "leakyrelu", slope = 0.2},'
                                  ' {type = "linear", out = 10, bias = false}]'))


def test_set_with_an_empty_value_is_the_empty_string():
    """`--set train.sign_key=` turns a key setting off (was: "'' is not a valid TOML value",
    since the empty text's first character "tested" as a list/string opener)."""
    cfg = loads_config("[model]\ninput = [4]\nlayers = [{type = \"linear\", out = 2}]\n",
                       overrides=["train.sign_key=/k", "train.sign_key="])
    assert cfg["train"]["sign_key"] == ""
