"""Training configuration: one flat set of typed keys, from YAML plus command-line overrides.

Resolution order (later wins): the defaults below, the YAML file (``--config cfg.yaml``), then
``--key value`` / ``--key=value`` overrides. Keys may be spelled with ``-`` or ``_``. Every
unknown key is rejected with the list of valid ones, every value is type-checked, and the
resolved config is written next to each checkpoint (``config.yaml``), so a run can always be
reproduced from its own directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from .budget import DEFAULT_BUDGETS, BudgetError, check_budget, distinct_budgets
from .engine import resolve_device
from .errors import CanetError, ConfigError
from .losses import LossWeights
from .space import DEFAULT_DEPTHS, DEFAULT_EMB, DEFAULT_HEADS, DEFAULT_HIDDEN, RoutingSpace

__all__ = [
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "config_from_dict",
    "dump_config",
    "ARCHITECTURE_KEYS",
    "PRECISIONS",
]

# Training precisions: fp32, or bf16 autocast (fp32 master weights, fp32 loss and softmax).
PRECISIONS = ("fp32", "bf16")

# Keys that change the weight layout or what the weights mean: a resumed run may not change them.
ARCHITECTURE_KEYS = (
    "max_len",
    "depths",
    "hidden",
    "emb",
    "heads",
    "router_dim",
    "router_heads",
    "residual_scaling",
    "fixed_config",
    "format",
    "column_map",
    "min_user_inter",
    "min_item_inter",
)


@dataclass
class TrainConfig:
    """Every setting of a training run (see docs/training.md for a table with explanations)."""

    # -- data ---------------------------------------------------------------------------------
    format: str | None = None  # None: detect from the file content
    column_map: dict[str, str] | None = None  # csv/atomic header names for user/item/timestamp
    min_user_inter: int = 0
    min_item_inter: int = 0
    max_len: int = 50
    # -- model --------------------------------------------------------------------------------
    depths: list[int] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    hidden: list[int] = field(default_factory=lambda: list(DEFAULT_HIDDEN))
    emb: list[int] = field(default_factory=lambda: list(DEFAULT_EMB))
    heads: int = DEFAULT_HEADS
    dropout: float = 0.2
    router_dim: int = 32
    router_heads: int = 4
    residual_scaling: bool = True
    # None: CANet (routed); "largest" / "smallest" / a config id: that plain sub-network only.
    fixed_config: str | int | None = None
    # -- optimisation -------------------------------------------------------------------------
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_step_size: int = 0  # StepLR period in epochs; 0 = constant learning rate
    lr_gamma: float = 0.5
    tau_start: float = 1.0  # Gumbel temperature at epoch 0
    tau_end: float = 1.0  # floor of the annealed temperature
    tau_decay: float = 1.0  # per-epoch factor: tau = max(tau_end, tau_start * tau_decay**epoch)
    # The paper's loss settings; their defaults live once, in canet.losses.LossWeights.
    guide_weight: float = LossWeights.guide
    uniform_weight: float = LossWeights.uniform
    balance_weight: float = LossWeights.balance  # not in the paper; 0 = the paper's objective
    guide_k: int = LossWeights.guide_k
    sharpness_emb: float = LossWeights.sharpness_emb
    sharpness_hidden: float = LossWeights.sharpness_hidden
    sharpness_depth: float = LossWeights.sharpness_depth
    # Not in the paper; null = its objective. A FLOPs fraction in (0, 1]: adds
    # flops_weight * (router's expected FLOPs fraction over the batch - flops_target)^2
    # (canet.losses.flops_loss), so training shapes the router toward that compute.
    flops_target: float | None = None
    # The penalty is small (0.01 for a 0.1 miss) beside next-item CE (~7-10 at the start) and
    # the guide/uniform terms (weight 0.01 each, values ~1-4): at 10 a 0.1 miss costs 0.1 of
    # loss and pulls with gradient 2 per unit of expected fraction, well above the uniform
    # term's pull toward the mean config cost. Measured (docs/training.md, 200 synthetic users,
    # 8 configs, 3 epochs, target 0.3 from 0.43): the last epoch's expected fraction was 0.434
    # at weight 0.1, 0.322 at 1, 0.296 at 10, 0.294 at 100 (Adam normalises the step, so past
    # ~10 a larger weight buys little), with the same next-item loss.
    flops_weight: float = 10.0
    validate_router_input: bool = False  # run the router's boundary checks on every batch
    max_bad_steps: int = 10  # NaN/inf losses or gradients tolerated before training stops
    clip_grad_norm: float = 0.0  # clip the total gradient norm to this; 0 = no clipping
    # Batch windows of similar length together (canet.data: SequenceData.train_batches), so a
    # log of short histories runs short batches; false = the plain shuffled order.
    length_buckets: bool = True
    precision: str = "fp32"  # "bf16": autocast with fp32 master weights (CUDA only)
    # -- evaluation / early stopping ----------------------------------------------------------
    eval_every: int = 1
    patience: int = 5  # validations without improvement before stopping; 0 = never stop early
    eval_batch_size: int = 256
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_history: bool = True
    # Serve-time budgets calibrated on the validation users into best/ when a routed run ends
    # (canet.calibrate); [] = no calibration.
    calibration_budgets: list[float] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    # -- runtime ------------------------------------------------------------------------------
    seed: int = 42
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads; 0 = leave PyTorch's default
    progress: bool = True  # tqdm progress bars

    # -- derived objects ----------------------------------------------------------------------
    def dataset_options(self) -> dict[str, Any]:
        """The data keys as keyword arguments of :func:`canet.data.load_dataset`."""
        return {
            "max_len": self.max_len,
            "format": self.format,
            "column_map": self.column_map,
            "min_user_inter": self.min_user_inter,
            "min_item_inter": self.min_item_inter,
        }

    def routing_space(self) -> RoutingSpace:
        try:
            return RoutingSpace(self.depths, self.hidden, self.emb, self.heads)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def loss_weights(self) -> LossWeights:
        return LossWeights(
            guide=self.guide_weight,
            uniform=self.uniform_weight,
            balance=self.balance_weight,
            guide_k=self.guide_k,
            sharpness_emb=self.sharpness_emb,
            sharpness_hidden=self.sharpness_hidden,
            sharpness_depth=self.sharpness_depth,
        )

    def fixed_config_id(self, space: RoutingSpace | None = None) -> int | None:
        """The config id of ``fixed_config`` in ``space`` (None for a routed CANet run)."""
        space = space or self.routing_space()
        value = self.fixed_config
        if value is None:
            return None
        if value == "largest":
            return space.largest_id
        if value == "smallest":
            return space.smallest_id
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(
                    f"fixed_config must be 'largest', 'smallest' or a config id in "
                    f"[0, {space.n_configs - 1}], got {short(self.fixed_config)}"
                ) from None
        if not 0 <= value < space.n_configs:
            raise ConfigError(
                f"fixed_config id must be in [0, {space.n_configs - 1}] for this routing space "
                f"({space.n_configs} configs), got {short(value)}"
            )
        return value

    def torch_device(self) -> torch.device:
        """``device`` as a torch.device, checked to exist here (ConfigError otherwise, e.g.
        "CUDA is not available in this torch build"). :meth:`validate` checks the syntax only,
        so a checkpoint saved on a GPU machine still loads on a CPU one."""
        try:
            return resolve_device(self.device)
        except (ValueError, CanetError) as error:
            raise ConfigError(str(error)) from None

    def tau(self, epoch: int) -> float:
        """Gumbel temperature of 0-based ``epoch``."""
        return max(self.tau_end, self.tau_start * self.tau_decay**epoch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Range checks beyond the types (raises ConfigError); returns self.

        Every numeric key has a range (:data:`INT_RANGES`, :data:`FLOAT_RANGES`, the list
        bounds below): a value out of it fails here with one line naming the key, instead of
        deep inside torch (an overflowing seed, a NaN weight decay) or as an allocation
        failure (a huge max_len).
        """
        for name, (low, high, why) in INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high, why)
        for name, (low, low_open, high, why) in FLOAT_RANGES.items():
            value = getattr(self, name)
            # Written so NaN fails too (it compares false with everything); an infinite loss
            # weight or temperature made every step non-finite (all skipped).
            inside = math.isfinite(value) and (value > low if low_open else value >= low) and (
                high is None or value < high)
            if not inside:
                if high is not None:
                    bound = f" in {'(' if low_open else '['}{low:g}, {high:g})"
                elif math.isinf(low):
                    bound = ""
                else:
                    bound = f" {'>' if low_open else '>='} {low:g}"
                raise ConfigError(f"{name} must be a finite number{bound}{why}, got {value}")
        for name in ("depths", "hidden", "emb"):
            for index, size in enumerate(getattr(self, name)):
                _check_int(f"{name}[{index}]", size, 1, LIST_MAX[name], "")
        if not self.ks:
            raise ConfigError(f"ks must be a non-empty list of ints >= 1, got {short(self.ks)}")
        for index, k in enumerate(self.ks):
            _check_int(f"ks[{index}]", k, 1, COUNT_MAX, "")
        try:
            distinct_budgets(self.calibration_budgets, "calibration_budgets",
                             "calibration_budgets[{index}]")
        except BudgetError as error:
            raise ConfigError(str(error)) from None
        try:
            resolve_device(self.device, check_available=False)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {list(PRECISIONS)}, got {short(self.precision)}"
            )
        if self.precision == "bf16" and not str(self.device).startswith("cuda"):
            raise ConfigError(
                f"precision bf16 trains on CUDA only (device is {short(self.device)}): on CPUs "
                "without native bf16 (AVX512-BF16/AMX) autocast is slower than fp32 (9x on "
                "this project's AMD EPYC machines, docs/training.md); use precision fp32"
            )
        if 10 not in self.ks:
            # Early stopping and model selection use NDCG@10 on the validation split.
            raise ConfigError(
                f"ks must contain 10 (validation selects on ndcg@10), got {short(self.ks)}"
            )
        if self.column_map is not None:
            # Checked here (not first by the reader) so the message is short and comes before
            # any data is read.
            unknown = sorted(set(self.column_map) - {"user", "item", "timestamp"})
            if unknown:
                raise ConfigError(f"column_map keys must be 'user', 'item', 'timestamp'; got "
                                  f"{short(unknown)}")
            empty = [role for role, name in self.column_map.items() if not name]
            if empty:
                raise ConfigError(f"column_map values must be non-empty column names; "
                                  f"{short(empty)} empty")
        if self.format is not None:
            from .data import FORMATS

            if self.format not in FORMATS:
                raise ConfigError(f"format must be one of {list(FORMATS)} or null, got "
                                  f"{short(self.format)}")
        if self.flops_target is not None:
            try:
                check_budget(self.flops_target, "flops_target")
            except BudgetError as error:
                raise ConfigError(str(error)) from None
            if self.fixed_config is not None:
                raise ConfigError(
                    f"flops_target trains the router, and fixed_config {short(self.fixed_config)} "
                    "has none; drop one of them"
                )
        self.fixed_config_id(self.routing_space())
        return self


# Upper bound of plain counts (epochs between decays, patience, filters...): a C int.
COUNT_MAX = 2**31 - 1
# max_len sizes every training window and the attention over it (memory ~ batch * max_len**2):
# far above any sequential-recommendation history, far below an allocation failure.
MAX_LEN_MAX = 100_000

# int key -> (min, max, why: appended to the message when non-empty).
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "min_user_inter": (0, COUNT_MAX, ""),
    "min_item_inter": (0, COUNT_MAX, ""),
    "max_len": (1, MAX_LEN_MAX, " (items of history per window; memory grows with "
                                "batch_size * max_len**2)"),
    "heads": (1, 4096, ""),
    "router_dim": (1, 1 << 16, ""),
    "router_heads": (1, 4096, ""),
    "epochs": (1, 1_000_000, ""),
    "batch_size": (1, 1 << 24, ""),
    "lr_step_size": (0, COUNT_MAX, ""),
    "guide_k": (1, COUNT_MAX, ""),
    "max_bad_steps": (0, COUNT_MAX, ""),
    "eval_every": (1, COUNT_MAX, ""),
    "patience": (0, COUNT_MAX, ""),
    "eval_batch_size": (1, 1 << 24, ""),
    "threads": (0, 4096, ""),
    # torch's seed range, less one: the noise generator is seeded with seed + 1.
    "seed": (-(2**63), 2**64 - 2, " (torch's seed range)"),
}
# float key -> (min, min excluded, upper bound (excluded) or None, why). All must be finite.
FLOAT_RANGES: dict[str, tuple[float, bool, float | None, str]] = {
    "dropout": (0.0, False, 1.0, ""),
    "lr": (0.0, True, None, ""),
    "weight_decay": (0.0, False, None, ""),
    "lr_gamma": (0.0, True, None, ""),
    "tau_start": (0.0, True, None, ""),
    "tau_end": (0.0, True, None, ""),
    "tau_decay": (0.0, True, None, ""),
    "guide_weight": (0.0, False, None, ""),
    "uniform_weight": (0.0, False, None, ""),
    "balance_weight": (0.0, False, None, ""),
    "flops_weight": (0.0, False, None, ""),
    # Exponents of the guide's soft labels: negative reverses them, 0 makes them uniform.
    "sharpness_emb": (-math.inf, False, None, ""),
    "sharpness_hidden": (-math.inf, False, None, ""),
    "sharpness_depth": (-math.inf, False, None, ""),
    "clip_grad_norm": (0.0, False, None, " (0 = off)"),
}
# Largest entry of each routing-space list.
LIST_MAX = {"depths": 1024, "hidden": 1 << 16, "emb": 1 << 16}


def _check_int(name: str, value: int, low: int, high: int, why: str) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}{why}, got {short(value)}")
    if value > high:
        raise ConfigError(f"{name} must be <= {high}{why}, got {short(value)}")


# Values a config may hold once YAML aliases are expanded: a training config has a few dozen,
# while an "alias bomb" (a few hundred bytes of nested aliases) expands to billions, which
# walking, coercing or printing would never finish.
MAX_CONFIG_NODES = 100_000
# Longest rendering of a value in an error message (messages stay one short line).
MAX_SHOWN = 80


class _ShortRepr(reprlib.Repr):
    def repr_int(self, value: int, level: int) -> str:
        # repr() of an int of more than 4300 digits raises ValueError (CPython's limit).
        if value.bit_length() > 128:
            return f"<int of {int(value.bit_length() * math.log10(2)) + 1} digits>"
        return repr(value)


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 3, 6, 6, 60


def short(value: Any) -> str:
    """``repr(value)`` bounded to MAX_SHOWN characters (nested and long values elided)."""
    text = _SHORT.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def check_size(data: Any, source: str) -> None:
    """Refuse a parsed YAML value of more than MAX_CONFIG_NODES values, counting every use
    of an alias (so a self-referencing or exponentially aliased value fails fast)."""
    budget = MAX_CONFIG_NODES
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(
                f"{source}: the config holds more than {MAX_CONFIG_NODES} values once YAML "
                "aliases are expanded (a training config has a few dozen); refusing it"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "mapping of str to str"
    return {int: "int", float: "number", str: "string", bool: "bool"}.get(hint, str(hint))


_DOTLESS_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint``; raises ConfigError naming the key."""

    def fail() -> ConfigError:
        return ConfigError(
            f"config key {name!r} expects {_type_name(hint)}, got {short(value)} "
            f"({type(value).__name__})"
        )

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise fail()
    if hint is type(None):
        if value is None:
            return None
        raise fail()
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item,) = typing.get_args(hint)
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise fail()
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond the float range
                raise fail() from None
        # YAML 1.1 (PyYAML) reads "5e-4" and "1E3" (no dot) as strings, in files and on the
        # command line alike; a user writing them means the number.
        if isinstance(value, str) and _DOTLESS_EXPONENT.fullmatch(value.strip()):
            return float(value)
        raise fail()
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail()
    raise fail()


def _canonical(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _unknown_key_error(keys: Iterable[str], source: str) -> ConfigError:
    valid = ", ".join(sorted(_FIELDS))
    keys = list(keys)
    shown = ", ".join(short(k) for k in keys[:5])
    if len(keys) > 5:
        shown += f" and {len(keys) - 5} more"
    return ConfigError(f"{source}: unknown config key(s) {shown}; valid keys: {valid}")


def config_from_dict(
    values: Mapping[str, Any], base: TrainConfig | None = None, source: str = "config"
) -> TrainConfig:
    """A validated config: ``base`` (default: the defaults) updated with ``values``.

    Raises ConfigError on an unknown key (listing the valid ones), a wrong type or a value out
    of range; messages name ``source`` (a file, or "command line").
    """
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping of config keys, got {type(values).__name__}"
        )
    check_size(dict(values), source)
    updates = {_canonical(str(key)): value for key, value in values.items()}
    unknown = [key for key in updates if key not in _FIELDS]
    if unknown:
        raise _unknown_key_error(unknown, source)
    resolved = (base or TrainConfig()).to_dict()
    for key, value in updates.items():
        try:
            resolved[key] = _coerce(key, value, _HINTS[key])
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    config = TrainConfig(**resolved)
    try:
        return config.validate()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Command-line overrides ``--key value`` or ``--key=value`` -> {key: value}.

    Values are read as YAML scalars/flow collections (``3`` -> int, ``1e-3`` -> float,
    ``true`` -> bool, ``null`` -> None, ``[2,4]`` -> list), so they type-check like the file.
    A bare ``--flag`` (followed by another option or nothing) means ``true``.
    """
    overrides: dict[str, Any] = {}
    index = 0
    args = list(args)
    while index < len(args):
        token = args[index]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                "command line: expected an option '--key value' or '--key=value', got "
                f"{short(token)}"
            )
        if "=" in token:
            key, text = token[2:].split("=", 1)
            index += 1
        elif index + 1 < len(args) and not args[index + 1].startswith("--"):
            key, text = token[2:], args[index + 1]
            index += 2
        else:
            key, text = token[2:], "true"
            index += 1
        key = _canonical(key)
        if key not in _FIELDS:
            raise _unknown_key_error([key], "command line")
        overrides[key] = _parse_value(key, text)
    return overrides


def _parse_value(key: str, text: str) -> Any:
    hint = _HINTS[key]
    # A string field keeps the text verbatim ("1e3" stays a string for e.g. a format name).
    if hint is str:
        return text
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        raise ConfigError(
            f"command line: cannot parse the value of --{key}: {short(text)}"
        ) from None
    check_size(value, f"command line: --{key}")
    return value


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (a mapping, or
    command-line tokens for :func:`parse_overrides`)."""
    config = TrainConfig()
    if path is not None:
        config = config_from_dict(read_yaml(path), config, source=os.fspath(path))
    if overrides:
        if not isinstance(overrides, Mapping):
            overrides = parse_overrides(overrides)
        config = config_from_dict(overrides, config, source="command line")
    # A config loaded to train here: refuse a device this machine lacks before any data is
    # read or run directory created (a saved config is only syntax-checked, see torch_device).
    config.torch_device()
    return config


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping); ConfigError otherwise."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: config file is not UTF-8 text ({error.reason})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: {problem}") from None
    except ValueError as error:  # e.g. an int of more digits than Python converts
        raise ConfigError(f"{path}: cannot read a value: {short(str(error))}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None
    check_size(data, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping of config keys, got {type(data).__name__}"
        )
    return data


def dump_config(config: TrainConfig) -> str:
    """The YAML text of a resolved config (round-trips through :func:`config_from_dict`)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
