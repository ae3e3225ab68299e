"""Tests for canet.config: YAML + command-line overrides, unknown keys, types, ranges."""

from __future__ import annotations

import pytest
import torch

from canet.config import (
    ARCHITECTURE_KEYS,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    read_yaml,
)
from canet.errors import ConfigError


def test_both_override_syntaxes_give_the_same_config() -> None:
    spaced = load_config(None, ["--epochs", "3", "--lr", "0.01", "--fixed-config", "largest"])
    joined = load_config(None, ["--epochs=3", "--lr=0.01", "--fixed_config=largest"])
    assert spaced == joined
    assert spaced.epochs == 3 and spaced.lr == 0.01 and spaced.fixed_config == "largest"


def test_override_values_are_typed_like_yaml() -> None:
    overrides = parse_overrides(["--depths=[1,2]", "--exclude-history", "false", "--format=null",
                                 "--progress"])
    assert overrides == {"depths": [1, 2], "exclude_history": False, "format": None,
                         "progress": True}
    assert parse_overrides(["--device", "cpu"]) == {"device": "cpu"}


def test_yaml_then_overrides(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: 7\nbatch_size: 16\nhidden: [8, 16]\nemb: [8, 16]\nheads: 2\n")
    config = load_config(path, ["--epochs", "2"])
    assert (config.epochs, config.batch_size, config.hidden) == (2, 16, [8, 16])


def test_unknown_key_is_rejected_with_the_valid_keys(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown config key.*'epoch'.*valid keys: .*epochs"):
        load_config(None, ["--epoch=3"])
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=f"{path}.*'learning_rate'.*valid keys"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": "three"}, "'epochs' expects int, got 'three'"),
        ({"epochs": 2.5}, "'epochs' expects int"),
        ({"lr": True}, "'lr' expects number"),
        ({"depths": [1, "x"]}, r"'depths\[1\]' expects int"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"dropout": 1.5}, r"dropout must be a finite number in \[0, 1\), got 1.5"),
        ({"fixed_config": 36}, r"fixed_config id must be in \[0, 35\]"),
        ({"fixed_config": "medium"}, "fixed_config must be 'largest', 'smallest'"),
        ({"hidden": [64, 96, 130]}, "divisible by heads"),
        ({"format": "parquet"}, "format must be one of"),
        # Infinite loss weights / temperatures made every step non-finite (all skipped).
        ({"guide_weight": float("inf")}, "guide_weight must be a finite number >= 0, got inf"),
        ({"uniform_weight": float("inf")}, "uniform_weight must be a finite"),
        ({"sharpness_depth": float("inf")}, "sharpness_depth must be a finite"),
        ({"tau_start": float("inf")}, "tau_start must be a finite"),
        ({"tau_end": float("nan")}, "tau_end must be a finite"),
        # Every numeric key is range-checked (issue 14, item 9).
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0, got nan"),
        ({"seed": 2**64 + 1}, r"seed must be <= 18446744073709551614 \(torch's seed range\)"),
        ({"seed": -(2**63) - 1}, "seed must be >= -9223372036854775808"),
        ({"max_len": 100_000_000}, r"max_len must be <= 100000 \(items of history"),
        ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        ({"lr": 10**400}, "'lr' expects number"),
        ({"lr_gamma": float("nan")}, "lr_gamma must be a finite number > 0"),
        ({"tau_decay": 0.0}, "tau_decay must be a finite number > 0, got 0.0"),
        ({"clip_grad_norm": float("inf")}, r"clip_grad_norm must be a finite number >= 0 \(0 = "),
        ({"sharpness_emb": float("nan")}, "sharpness_emb must be a finite number, got nan"),
        ({"threads": 10**6}, "threads must be <= 4096"),
        ({"epochs": 10**12}, "epochs must be <= 1000000"),
        ({"batch_size": 2**40}, "batch_size must be <= 16777216"),
        ({"patience": -1}, "patience must be >= 0"),
        ({"hidden": [8, 10**8]}, r"hidden\[1\] must be <= 65536, got 100000000"),
        ({"depths": [0, 2]}, r"depths\[0\] must be >= 1"),
        ({"ks": [10, 0]}, r"ks\[1\] must be >= 1, got 0"),
        ({"ks": []}, "ks must be a non-empty list"),
        ({"column_map": {f"k{i}": "x" for i in range(1000)}},
         r"column_map keys must be 'user', 'item', 'timestamp'; got \['k0', 'k1', "),
        ({"column_map": {"user": ""}}, r"column_map values must be non-empty .*\['user'\]"),
        ({"device": "nonsense"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'nonsense'"),
        ({"device": "meta"}, "device 'meta' holds tensor shapes only"),
        ({"device": "mps"}, "canet runs on CPUs and CUDA GPUs"),
        # The FLOPs target (issue 16): a fraction of the largest config's FLOPs, routed runs only.
        ({"flops_target": 0}, r"flops_target must be a number in \(0, 1\] .*got 0"),
        ({"flops_target": 1.5}, r"flops_target must be a number in \(0, 1\] .*got 1.5"),
        ({"flops_target": float("nan")}, r"flops_target must be a number in \(0, 1\] .*got nan"),
        ({"flops_target": -1}, r"flops_target must be a number in \(0, 1\] .*got -1"),
        ({"flops_target": "a lot"}, "'flops_target' expects number or null, got 'a lot'"),
        ({"flops_weight": float("nan")}, "flops_weight must be a finite number >= 0, got nan"),
        ({"flops_weight": -1}, "flops_weight must be a finite number >= 0, got -1"),
        ({"flops_target": 0.3, "fixed_config": "largest"},
         "flops_target trains the router, and fixed_config 'largest' has none"),
    ],
)
def test_wrong_values_are_rejected(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(overrides)


def test_flops_target_is_off_by_default_and_set_by_either_spelling() -> None:
    assert TrainConfig().flops_target is None and TrainConfig().flops_weight == 10.0
    for args in (["--flops_target", "0.3"], ["--flops-target", "0.3"], ["--flops-target=0.3"]):
        assert load_config(None, args).flops_target == 0.3
    config = load_config(None, ["--flops-target", "1", "--flops_weight", "0"])
    assert (config.flops_target, config.flops_weight) == (1.0, 0.0)
    assert isinstance(config.flops_target, float)
    assert load_config(None, ["--flops-target", "null"]).flops_target is None
    # Not architecture keys: a resumed run may change them.
    assert not {"flops_target", "flops_weight"} & set(ARCHITECTURE_KEYS)


def test_int_accepted_for_float_and_config_id_by_number() -> None:
    config = config_from_dict({"lr": 1, "fixed_config": 3})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.fixed_config_id() == 3
    assert config_from_dict({"fixed_config": "smallest"}).fixed_config_id() == 0
    assert TrainConfig().fixed_config_id() is None


@pytest.mark.parametrize(("text", "expected"), [("5e-4", 5e-4), ("1E-3", 1e-3), ("2e0", 2.0),
                                                 (".5e-2", 0.005), ("+3.e-1", 0.3)])
def test_exponent_without_a_dot_is_a_number(tmp_path, text: str, expected: float) -> None:
    # YAML 1.1 reads these as strings; on the command line and in a file they mean numbers.
    assert load_config(None, [f"--lr={text}"]).lr == pytest.approx(expected)
    assert load_config(None, ["--lr", text]).lr == pytest.approx(expected)
    path = tmp_path / "cfg.yaml"
    path.write_text(f"lr: {text}\nweight_decay: {text}\n")
    config = load_config(path)
    assert config.lr == pytest.approx(expected) and config.weight_decay == pytest.approx(expected)
    for bad in ("5e", "e-4", "5e-4x", "nan", "inf", "1e-4e2"):
        with pytest.raises(ConfigError, match="'lr' expects number"):
            load_config(None, [f"--lr={bad}"])


def test_dump_round_trips(tmp_path) -> None:
    config = config_from_dict({"epochs": 4, "column_map": {"user": "uid", "item": "iid"}})
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert config_from_dict(read_yaml(path)) == config


def test_bad_yaml_names_the_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nlr: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{path}:"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_tau_annealing() -> None:
    config = config_from_dict({"tau_start": 2.0, "tau_end": 0.5, "tau_decay": 0.5})
    assert [config.tau(e) for e in range(4)] == [2.0, 1.0, 0.5, 0.5]


def test_positional_token_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected an option"):
        parse_overrides(["3"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_when_loading_a_config_to_train() -> None:
    # A saved config (config_from_dict) may come from a GPU machine: only its syntax is
    # checked; load_config (a config to train with here) and torch_device check availability.
    saved = config_from_dict({"device": "cuda:1"})
    with pytest.raises(ConfigError, match="device 'cuda:1': CUDA is not available"):
        saved.torch_device()
    with pytest.raises(ConfigError, match="device 'cuda': CUDA is not available"):
        load_config(None, ["--device", "cuda"])


def test_every_numeric_key_has_a_range() -> None:
    # A new numeric key must get a range too (validate walks these tables).
    from canet.config import FLOAT_RANGES, INT_RANGES, LIST_MAX

    numeric = {name for name, hint in TrainConfig.__annotations__.items()
               if hint in ("int", "float", "list[int]")}
    assert numeric - {"fixed_config"} == set(INT_RANGES) | set(FLOAT_RANGES) | set(LIST_MAX) | {
        "ks"}


def test_huge_values_from_the_command_line_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="seed must be <="):
        load_config(None, ["--seed", "18446744073709551617"])
    with pytest.raises(ConfigError, match="weight_decay must be a finite number") as caught:
        load_config(None, ["--weight-decay", ".nan"])
    assert "\n" not in str(caught.value)


def _alias_bomb(levels: int = 9) -> str:
    # 297 bytes that expand to 9**9 (387 million) values: before, this ran out of memory.
    parts, previous = ["&a [l,l,l,l,l,l,l,l,l]"], "a"
    for name in "bcdefghijklm"[: levels - 1]:
        parts.append(f"&{name} [" + ",".join([f"*{previous}"] * 9) + "]")
        previous = name
    return "epochs: [" + ", ".join(parts) + "]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_alias_bomb(), "more than 100000 values once YAML aliases are expanded"),
        ("epochs: &a [*a]\n", "more than 100000 values once YAML aliases are expanded"),
        ("epochs: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("epochs: " + "1" * 5000 + "\n", "cannot read a value"),
        ("format: " + "x" * 5000 + "\n", "format must be one of"),
        ("ks: [" + ",".join(["1"] * 50_000) + "]\n", "ks must contain 10"),
        ("fixed_config: " + "y" * 5000 + "\n", "fixed_config must be"),
        ("epochs: " + "z" * 5000 + "\n", "'epochs' expects int"),
        ("".join(f"bad{i}: 1\n" for i in range(1000)), "unknown config key.* and 995 more"),
    ],
    ids=["bomb", "self_alias", "deep", "huge_int", "long_string", "long_list", "long_config",
         "long_wrong_type", "many_unknown_keys"],
)
def test_explosive_configs_give_short_one_line_errors(tmp_path, text, message) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    rendered = str(caught.value)
    assert "\n" not in rendered
    # The valid-keys list of an unknown key is the one long (but bounded) part.
    assert len(rendered.split("; valid keys:")[0]) < 300 + len(str(path)), rendered


def test_explosive_command_line_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="--ks: the config holds more than 100000 values"):
        load_config(None, ["--ks", "&a [*a]"])
    with pytest.raises(ConfigError, match="seed must be <= .*got <int of 400 digits>"):
        config_from_dict({"seed": 10**399})
