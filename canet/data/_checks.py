"""Argument checks shared by the dataset builder and the synthetic generator."""

from __future__ import annotations

from typing import Any

import numpy as np

from canet.errors import ConfigError


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int; ConfigError unless it is an int (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
