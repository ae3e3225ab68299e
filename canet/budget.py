"""Serve-time compute budgets: the router's argmax biased toward cheaper sub-networks.

With a routing penalty ``lam >= 0`` a user goes to ``argmax_c (logits[c] - lam * fraction[c])``,
where ``fraction[c]`` is config ``c``'s inference FLOPs over the largest config's
(:func:`flops_fractions`, router excluded); a hard cap ``max_flops`` removes every config whose
fraction is above it. ``lam = 0`` without a cap is the router's own argmax, exactly.

Raising ``lam`` can only move a user to a config of lower cost (for ``lam' > lam``, a config
chosen at ``lam'`` that cost more than the one chosen at ``lam`` would have beaten it at
``lam`` too), so the mean fraction over a set of users never rises with ``lam``. The ``lam`` of
a budget ``b`` (mean fraction at or under ``b`` on calibration users) is therefore found by
bisection: :func:`calibrate_lambda`. A :class:`BudgetTable` holds, per budget, its ``lam``,
the fraction achieved on the calibration users and their NDCG@10; a checkpoint stores it as
``calibration.json`` (``canet calibrate``), and ``Engine(model, budget=b)`` looks ``b`` up in it.

Every routing decision with a penalty goes through :func:`route_with_penalty`, in float64, so
calibration and every backend apply the same arithmetic to the same logits. Not float32: its
rounding of ``logits - lam * fraction`` (a half-ulp of the logits, about 1e-7 of them) breaks
the monotonicity above at that scale, so the mean fraction could fall and rise again as ``lam``
grows by parts in a million and the bisection would settle on a ``lam`` that is not the
smallest; in float64 (exact for float32, float16 and bfloat16 logits) that scale is 1e-16.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch
from torch import Tensor

from .errors import CanetError
from .flops import flops
from .space import RoutingSpace

__all__ = [
    "DEFAULT_BUDGETS",
    "BudgetError",
    "BudgetPoint",
    "BudgetTable",
    "RoutingPenalty",
    "calibrate_lambda",
    "check_achievable",
    "check_budget",
    "check_routed",
    "distinct_budgets",
    "flops_fractions",
    "mean_fraction",
    "route_with_penalty",
    "smallest_penalty",
    "stable_penalty",
]

# Bisection steps of calibrate_lambda: the bracket [0, hi] shrinks 2^-60-fold, about the
# float64 resolution of the penalty vector.
BISECTION_STEPS = 60
TABLE_VERSION = 1
# The budgets calibrated at the end of training and by `canet calibrate` without --budgets
# (those below a model's smallest achievable budget are left out; 1.0 is the router's own).
DEFAULT_BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class BudgetError(CanetError, ValueError):
    """A budget, cap or calibration table that cannot be used; the message says why."""


def flops_fractions(space: RoutingSpace, max_len: int, num_items: int) -> tuple[float, ...]:
    """Inference FLOPs of each config over the largest config's (router excluded), in config-id
    order, for full ``max_len`` windows and ``num_items`` items: the costs a budget counts."""
    largest = flops(space.configs[space.largest_id], max_len, num_items)
    return tuple(flops(c, max_len, num_items) / largest for c in space.configs)


def check_budget(value: object, name: str = "budget") -> float:
    """``value`` as a float in (0, 1], else BudgetError saying what was expected and what came."""
    expected = (
        f"{name} must be a number in (0, 1] (mean FLOPs per user as a fraction of the largest "
        "sub-network's)"
    )
    if isinstance(value, bool):
        raise BudgetError(f"{expected}, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float's range
        raise BudgetError(f"{expected}, got {str(value)[:40]!r}") from None
    if not (math.isfinite(number) and 0.0 < number <= 1.0):
        # A string is quoted: float() accepts surrounding whitespace, newlines included.
        shown = repr(value[:40]) if isinstance(value, str) else str(value)[:40]
        raise BudgetError(f"{expected}, got {shown}")
    return number


def distinct_budgets(
    values: Sequence[object], name: str = "budgets", entry: str = "budget"
) -> list[float]:
    """``values`` as budgets, in their order: each checked by :func:`check_budget` (``entry``
    names one in the message; ``{index}`` in it is replaced by its position), none twice
    (BudgetError "``name`` must be distinct")."""
    budgets: list[float] = []
    for index, value in enumerate(values):
        budget = check_budget(value, entry.format(index=index))
        if budget in budgets:
            raise BudgetError(f"{name} must be distinct, got {budget:g} twice")
        budgets.append(budget)
    return budgets


def check_achievable(budget: float, smallest: float) -> None:
    """BudgetError naming ``smallest`` (every user on the cheapest config) when ``budget`` is
    below it."""
    if budget < smallest:
        raise BudgetError(
            f"budget {budget:g} is below the cheapest sub-network's cost: the smallest "
            f"achievable budget is {smallest:.4f} (every user on the smallest config)"
        )


def check_routed(fixed_config_id: int | None, what: str = "a budget") -> None:
    """BudgetError when ``what`` (a budget, a cap, a calibration) is asked of a fixed-config
    run: every user runs config ``fixed_config_id``, there is no routing to bias."""
    if fixed_config_id is not None:
        raise BudgetError(
            f"{what} does not apply to a fixed-config run (every user runs config "
            f"{fixed_config_id}, there is no routing to bias)"
        )


@dataclass(frozen=True)
class RoutingPenalty:
    """How the router's argmax is biased: ``logits - lam * fraction``, configs above
    ``max_flops`` (a fraction of the largest config's FLOPs) never chosen."""

    lam: float = 0.0
    max_flops: float | None = None

    def __post_init__(self) -> None:
        lam = self.lam
        number = isinstance(lam, (int, float)) and not isinstance(lam, bool)
        try:
            lam = float(lam) if number else math.nan
        except OverflowError:  # an int past float's range
            lam = math.inf
        if not (math.isfinite(lam) and lam >= 0):
            raise BudgetError(f"routing penalty lambda must be a finite number >= 0, got "
                              f"{str(self.lam)[:40]!r}")
        # Stored as floats: a cap given as a string ("0.5", a CLI value) would otherwise reach
        # the tensor comparison in vector() and the messages' formatting.
        object.__setattr__(self, "lam", lam)
        if self.max_flops is not None:
            object.__setattr__(self, "max_flops", check_budget(self.max_flops, "max_flops"))

    @property
    def is_identity(self) -> bool:
        """True when routing is the router's own argmax (no penalty, no cap)."""
        return self.lam == 0 and self.max_flops is None

    def vector(
        self, fractions: Sequence[float], device: torch.device | str | None = None
    ) -> Tensor | None:
        """float64 ``[C]`` subtracted from the logits (``+inf`` for configs above the cap), or
        None for the identity. BudgetError when the cap leaves no config."""
        if self.is_identity:
            return None
        costs = torch.tensor(list(fractions), dtype=torch.float64)
        penalty = self.lam * costs
        if self.max_flops is not None:
            allowed = costs <= self.max_flops
            if not bool(allowed.any()):
                raise BudgetError(
                    f"max_flops {self.max_flops:g} is below every sub-network's cost; the "
                    f"smallest achievable is {float(costs.min()):.4f}"
                )
            penalty = penalty.masked_fill(~allowed, math.inf)
        return penalty.to(device=device)


def route_with_penalty(logits: Tensor, penalty: Tensor | None) -> Tensor:
    """Config id per user: ``argmax(logits - penalty)`` in float64 (module docstring). logits
    ``[B, C]``, penalty ``[C]`` from :meth:`RoutingPenalty.vector` (None: plain argmax in the
    logits' dtype) -> ``[B]`` int64."""
    if penalty is None:
        return logits.argmax(dim=-1)
    return (logits.double() - penalty.double()).argmax(dim=-1)


def mean_fraction(config_ids: Tensor, fractions: Sequence[float]) -> float:
    """Mean FLOPs fraction of users routed to ``config_ids [U]``: the exact mean of their
    costs, rounded once. Exact, because calibration compares it with budgets that are costs
    themselves: users all on one config must cost exactly its fraction (a float64 sum of U
    equal values divided by U need not be), else the smallest achievable budget looks out of
    reach and the bisection's bracket runs to its 2^100 limit."""
    if config_ids.numel() == 0:
        raise BudgetError("no users to measure the FLOPs of")
    counts = torch.bincount(config_ids.flatten().cpu(), minlength=len(fractions)).tolist()
    total = sum(n * Fraction(f) for n, f in zip(counts, fractions, strict=True) if n)
    return float(total / config_ids.numel())


def calibrate_lambda(
    logits: Tensor,
    fractions: Sequence[float],
    budget: float,
    max_flops: float | None = None,
) -> tuple[float, float]:
    """The smallest penalty ``lam`` (to float precision) whose routing of the calibration users
    ``logits [U, C]`` has a mean FLOPs fraction at or under ``budget``; returns
    ``(lam, achieved fraction)``. Deterministic (bisection on a bracket that does not depend on
    ``budget``, so a larger budget never gets a larger ``lam``). ``lam = 0`` when the router's
    own routing fits. BudgetError when ``budget`` is below what routing every user to the
    cheapest allowed config costs (the message names that smallest achievable budget)."""
    budget = check_budget(budget)
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] != len(fractions):
        raise BudgetError(
            f"calibration needs router logits [users >= 1, {len(fractions)}], got "
            f"{tuple(logits.shape)}"
        )
    logits = logits.detach()

    def cost(lam: float) -> float:
        vector = RoutingPenalty(lam, max_flops).vector(fractions, logits.device)
        return mean_fraction(route_with_penalty(logits, vector), fractions)

    check_achievable(budget, _cheapest(fractions, max_flops))
    at_zero = cost(0.0)
    if at_zero <= budget:
        return 0.0, at_zero
    # The bracket's top does not depend on the budget (see smallest_penalty).
    high, low = smallest_penalty(logits, fractions, max_flops), 0.0
    if cost(high) > budget:  # the bisection keeps cost(high) <= budget: it must hold at the top
        raise BudgetError(
            f"no routing penalty up to {high:g} routes every calibration user to the cheapest "
            "config (are the router logits finite?)"
        )
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if cost(middle) <= budget:
            high = middle
        else:
            low = middle
    lam = stable_penalty(logits, fractions, high, max_flops)
    return lam, cost(lam)


def stable_penalty(
    logits: Tensor, fractions: Sequence[float], lam: float, max_flops: float | None = None
) -> float:
    """The middle of the range of penalties that route ``logits [U, C]`` exactly as ``lam``
    does: from ``lam`` up to the next penalty at which some user moves to a cheaper config
    (twice ``lam`` when none will). ``lam = 0`` is returned as is (the router's own routing).

    The bisection's ``lam`` lies within float precision of a tie: at the penalty where the last
    user needed moved, that user's two configs score equally. Router logits that differ by an
    ulp (another backend, another batch) would move the user back and the budget would be
    exceeded on the very users it was calibrated on. In the middle of the range every user's
    choice has the widest margin the calibration users allow, and the routing (so the
    achieved fraction) is unchanged."""
    if lam == 0.0:
        return 0.0
    vector = RoutingPenalty(lam, max_flops).vector(fractions, logits.device)
    costs = torch.tensor(list(fractions), dtype=torch.float64, device=logits.device)
    allowed = costs <= (math.inf if max_flops is None else max_flops)
    following = math.inf
    for rows in logits.detach().split(1 << 14):  # bounded memory: [rows, C] float64 at a time
        rows = rows.double()
        chosen = route_with_penalty(rows, vector)
        # User b on config c moves to a cheaper config j once lam * (f_c - f_j) > l_c - l_j.
        saving = costs[chosen][:, None] - costs[None, :]
        crossing = (rows.gather(1, chosen[:, None]) - rows) / saving
        moves = (saving > 0) & allowed[None, :] & (crossing > lam)
        if bool(moves.any()):
            following = min(following, float(crossing[moves].min()))
    return 2.0 * lam if math.isinf(following) else 0.5 * (lam + following)


def _cheapest(fractions: Sequence[float], max_flops: float | None) -> float:
    """The cheapest config's fraction among those the cap allows (all when none does: the
    penalty vector refuses such a cap)."""
    allowed = [f for f in fractions if max_flops is None or f <= max_flops]
    return min(allowed) if allowed else min(fractions)


def smallest_penalty(
    logits: Tensor, fractions: Sequence[float], max_flops: float | None = None
) -> float:
    """A penalty (a power of 2) large enough that every user of ``logits [U, C]`` takes the
    cheapest allowed config, with a margin: twice the first power of 2 that does (the last
    user to move may be within rounding of a tie just below it; see :func:`stable_penalty`).
    The top of :func:`calibrate_lambda`'s bracket, and the table's lambda at its smallest
    achievable budget."""
    logits = logits.detach()
    cheapest = _cheapest(fractions, max_flops)
    high = 1.0
    while high < 1e30:
        vector = RoutingPenalty(high, max_flops).vector(fractions, logits.device)
        if mean_fraction(route_with_penalty(logits, vector), fractions) <= cheapest:
            break
        high *= 2.0
    return 2.0 * high


@dataclass(frozen=True)
class BudgetPoint:
    """One calibrated budget: its penalty, the fraction achieved and NDCG@10 on the
    calibration users (None when not measured)."""

    budget: float
    lam: float
    flops_fraction: float
    ndcg10: float | None = None


@dataclass(frozen=True)
class BudgetTable:
    """Calibrated budgets of one trained model, in increasing budget order.

    ``smallest_fraction``/``lam_smallest``: the cheapest achievable budget and a penalty that
    routes every calibration user to the cheapest config (what :meth:`penalty` gives a budget
    below every calibrated routing). ``split``/``num_users``: the calibration users
    (validation, by default).
    """

    points: tuple[BudgetPoint, ...]
    smallest_fraction: float
    lam_smallest: float
    split: str = "valid"
    num_users: int = 0

    def __post_init__(self) -> None:
        budgets = [p.budget for p in self.points]
        if not budgets or budgets != sorted(set(budgets)):
            raise BudgetError(f"a budget table needs distinct budgets in increasing order, got "
                              f"{budgets}")
        if any(a.lam < b.lam for a, b in zip(self.points, self.points[1:], strict=False)):
            raise BudgetError("a budget table's lambdas must not increase with the budget")
        # penalty() falls back to lam_smallest below the first point: it must cost no more.
        if self.lam_smallest < self.points[0].lam:
            raise BudgetError(
                f"a budget table's lam_smallest ({self.lam_smallest:g}) must be at least the "
                f"lambda of its smallest budget ({self.points[0].lam:g} at "
                f"{self.points[0].budget:g})"
            )

    @property
    def budgets(self) -> list[float]:
        return [p.budget for p in self.points]

    def penalty(
        self, budget: float | None = None, max_flops: float | None = None
    ) -> RoutingPenalty:
        """The routing penalty for ``budget`` (None or 1.0: the router's own routing) with an
        optional hard cap: the smallest calibrated ``lam`` whose achieved fraction on the
        calibration users is at or under ``budget``. A calibrated budget gets its own ``lam``;
        one between two calibrated budgets gets the ``lam`` of the largest calibrated routing
        that fits under it (not an interpolation of lambdas, which can overshoot by far where
        many users sit near one threshold), so the calibration users stay at or under every
        budget; one at or above the router's own fraction gets 0. A larger budget never gets a
        larger ``lam``. BudgetError below the smallest achievable budget."""
        if budget is None:
            return RoutingPenalty(0.0, max_flops)
        budget = check_budget(budget)
        check_achievable(budget, self.smallest_fraction)
        if budget == 1.0:
            return RoutingPenalty(0.0, max_flops)
        fitting = [p.lam for p in self.points if p.flops_fraction <= budget]
        return RoutingPenalty(min(fitting, default=self.lam_smallest), max_flops)

    # -- JSON (calibration.json) -----------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {
                "version": TABLE_VERSION,
                "split": self.split,
                "num_users": self.num_users,
                "smallest_fraction": self.smallest_fraction,
                "lam_smallest": self.lam_smallest,
                "points": [asdict(p) for p in self.points],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "calibration.json") -> BudgetTable:
        """Parse and validate; BudgetError naming ``source`` and what is wrong."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
                raise ValueError(f"expected a JSON object with version {TABLE_VERSION}")
            points = []
            for raw in data["points"]:
                if set(raw) != {"budget", "lam", "flops_fraction", "ndcg10"}:
                    raise ValueError(f"a point needs budget, lam, flops_fraction, ndcg10: {raw}")
                point = BudgetPoint(
                    check_budget(raw["budget"]), _finite(raw["lam"], "lam"),
                    _finite(raw["flops_fraction"], "flops_fraction"),
                    None if raw["ndcg10"] is None else _finite(raw["ndcg10"], "ndcg10"),
                )
                RoutingPenalty(point.lam)  # lam >= 0
                points.append(point)
            split, num_users = data["split"], data["num_users"]
            if not isinstance(split, str):
                raise ValueError(f"split must be a string, got {split!r}")
            if isinstance(num_users, bool) or not isinstance(num_users, int) or num_users < 0:
                raise ValueError(f"num_users must be an int >= 0, got {num_users!r}")
            return cls(
                tuple(points), check_budget(data["smallest_fraction"], "smallest_fraction"),
                _finite(data["lam_smallest"], "lam_smallest"), split, num_users,
            )
        except KeyError as error:
            raise BudgetError(f"{source}: invalid calibration table: missing key {error}") from None
        except (TypeError, ValueError) as error:  # BudgetError is a ValueError
            raise BudgetError(f"{source}: invalid calibration table: {error}") from None


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
