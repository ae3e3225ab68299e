"""The routing space: every sub-network architecture a user can be routed to."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_DEPTHS", "DEFAULT_EMB", "DEFAULT_HEADS", "DEFAULT_HIDDEN", "Config", "RoutingSpace",
]


@dataclass(frozen=True, order=True)
class Config:
    """One sub-network: ``depth`` blocks of width ``hidden`` over ``emb``-wide embeddings.

    Every weight of the sub-network is a prefix slice of the supernet's max-size tensors.
    """

    depth: int
    hidden: int
    emb: int


def _sizes(name: str, values: Iterable[int]) -> tuple[int, ...]:
    try:
        sizes = tuple(values)
    except TypeError as err:
        raise ValueError(
            f"RoutingSpace: {name} must be a sequence of ints, got {values!r}"
        ) from err
    if not sizes:
        raise ValueError(f"RoutingSpace: {name} must not be empty")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"RoutingSpace: {name} must hold positive ints, got {size!r} in {sizes}"
            )
    if any(a >= b for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(f"RoutingSpace: {name} must be strictly increasing, got {sizes}")
    return sizes


# The paper's routing space: 4 depths x 3 hidden sizes x 3 embedding sizes = 36 configs.
DEFAULT_DEPTHS: tuple[int, ...] = (2, 4, 6, 8)
DEFAULT_HIDDEN: tuple[int, ...] = (64, 96, 128)
DEFAULT_EMB: tuple[int, ...] = (64, 96, 128)
DEFAULT_HEADS = 4


class RoutingSpace:
    """Depth x hidden x emb choices; configs enumerated hidden-major, then depth, then emb.

    The enumeration follows the paper's code, so config 0 is the smallest sub-network and the
    last config is the largest (the full supernet). Each hidden size must be divisible by
    ``heads``: heads are interleaved over channels, so a hidden prefix keeps all heads.
    """

    def __init__(
        self,
        depths: Sequence[int] = DEFAULT_DEPTHS,
        hidden: Sequence[int] = DEFAULT_HIDDEN,
        emb: Sequence[int] = DEFAULT_EMB,
        heads: int = DEFAULT_HEADS,
    ) -> None:
        self.depths = _sizes("depths", depths)
        self.hidden = _sizes("hidden", hidden)
        self.emb = _sizes("emb", emb)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"RoutingSpace: heads must be a positive int, got {heads!r}")
        bad = [h for h in self.hidden if h % heads]
        if bad:
            raise ValueError(
                f"RoutingSpace: every hidden size must be divisible by heads={heads}, "
                f"but {bad} are not"
            )
        self.heads = heads
        self.configs: list[Config] = [
            Config(d, h, e) for h in self.hidden for d in self.depths for e in self.emb
        ]
        self._index = {config: i for i, config in enumerate(self.configs)}

    @property
    def n_configs(self) -> int:
        return len(self.configs)

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def max_depth(self) -> int:
        return self.depths[-1]

    @property
    def max_hidden(self) -> int:
        return self.hidden[-1]

    @property
    def max_emb(self) -> int:
        return self.emb[-1]

    @property
    def largest_id(self) -> int:
        return len(self.configs) - 1

    @property
    def smallest_id(self) -> int:
        return 0

    def index(self, config: Config) -> int:
        """Config id of ``config``; ValueError when it is not in this space."""
        try:
            return self._index[config]
        except KeyError:
            raise ValueError(f"{config} is not in {self}") from None

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [C, 3]: row c = (depth, hidden, emb) of config c (the planner's input)."""
        rows = [(c.depth, c.hidden, c.emb) for c in self.configs]
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def to_dict(self) -> dict:
        return {
            "depths": list(self.depths),
            "hidden": list(self.hidden),
            "emb": list(self.emb),
            "heads": self.heads,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RoutingSpace:
        unknown = set(data) - {"depths", "hidden", "emb", "heads"}
        if unknown:
            raise ValueError(f"RoutingSpace: unknown keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoutingSpace) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.depths, self.hidden, self.emb, self.heads))

    def __repr__(self) -> str:
        return (
            f"RoutingSpace(depths={self.depths}, hidden={self.hidden}, emb={self.emb}, "
            f"heads={self.heads})"
        )
