"""canet.Engine: routed inference, users grouped by architecture, on a chosen backend.

``Engine(model).score(seqs)`` equals ``model.score(seqs)`` but runs every user through only
the sub-network it is routed to, so the FLOPs the router saves are really saved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _ext, backends, ops
from .backends import BackendUnavailableError
from .budget import BudgetError, BudgetTable, RoutingPenalty, check_budget
from .checks import check_config_ids, check_sequences
from .flops import batch_flops, flops, flops_router
from .model import CANet
from .space import Config

__all__ = ["Engine", "PlanSummary", "GroupSpan", "resolve_device", "routing_penalty"]

# Recommend scores at most this many (user, item) pairs at once, whatever the batch size.
DEFAULT_MAX_SCORE_ELEMENTS = 1 << 24


# Device types canet runs on (training and inference); others fail deep inside torch.
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device, *, check_available: bool = True) -> torch.device:
    """``device`` parsed and checked: a torch.device of a type canet runs on that exists here
    (``check_available=False``: the parse and type checks only, e.g. for a saved config that
    may come from another machine).

    Raises ValueError for a malformed device or a type canet does not run on ("meta" holds
    shapes only, no data), and BackendUnavailableError for a CUDA device this torch build or
    machine lacks, each with a one-line message saying what was expected and what came.
    """
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)[:80]!r}"
        ) from None
    if parsed.type == "meta":
        raise ValueError(
            "device 'meta' holds tensor shapes only, no data, so nothing can be computed on "
            "it; use 'cpu' or 'cuda'"
        )
    if parsed.type not in DEVICE_TYPES:
        raise ValueError(
            f"device must be 'cpu', 'cuda' or 'cuda:N' (canet runs on CPUs and CUDA GPUs), "
            f"got {str(device)[:80]!r}"
        )
    if parsed.type == "cuda" and check_available:
        if torch.version.cuda is None:
            raise BackendUnavailableError(
                f"device {str(device)!r}: CUDA is not available in this torch build "
                f"({torch.__version__}); use 'cpu' or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {str(device)!r}: CUDA is not available: torch {torch.__version__} "
                "sees no CUDA GPU (no driver, or CUDA_VISIBLE_DEVICES hides them); use 'cpu'"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise BackendUnavailableError(
                f"device {str(device)!r} does not exist: torch sees {count} CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1})"
            )
    return parsed


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch.dtype from itself or its name; ValueError naming the floating-point ones."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.strip().removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(
        "Engine dtype must be a torch.dtype or its name (float32, float64, float16, "
        f"bfloat16), got {str(dtype)[:60]!r}"
    )


@dataclass(frozen=True)
class GroupSpan:
    """One non-empty group: the users of ``config`` are sorted rows ``start:end``."""

    config_id: int
    config: Config
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PlanSummary:
    """What the engine did with the last batch: routing, groups, compute."""

    histogram: list[int]  # users per config id
    groups: list[GroupSpan]  # non-empty groups in execution order
    layer_active: list[int]  # users still running at each layer (a prefix of sorted rows)
    flops: int  # supernet FLOPs of the routed batch
    flops_router: int  # router FLOPs of the batch (0 when config ids were given)
    flops_largest: int  # supernet FLOPs had every user run the largest config
    order: Tensor = field(repr=False)  # [B] original user index of each sorted row

    @property
    def num_users(self) -> int:
        return sum(self.histogram)

    @property
    def flops_fraction(self) -> float:
        """Routed supernet FLOPs over all-largest FLOPs (1 - the reduction)."""
        return self.flops / self.flops_largest if self.flops_largest else 0.0


class Engine:
    """Routed inference over one CANet's weights.

    Args:
        model: a CANet; the engine reads its state_dict (the canonical schema) and keeps
            references to those tensors, no second copy (unless ``dtype`` asks for another
            precision). Later in-place updates of the model's weights are seen by the engine.
        backend: "auto" | "torch" | "cpu" | "triton". "auto" picks triton on a GPU, cpu on a
            CPU, and falls back to torch with a one-time warning.
        dtype: compute dtype, a torch.dtype or its name ("float32", "torch.bfloat16")
            (default: the model's).
        max_score_elements: bound on the (user, item) scores ``recommend`` holds at once
            (where it builds them: see :meth:`recommend`).
        budget: serve-time compute budget in (0, 1]: the router's argmax is biased by the
            penalty calibrated for it (``budget_table``, default ``model.budget_table``, which
            a checkpoint's calibration.json fills: ``canet calibrate``) so that the mean FLOPs
            per user, as a fraction of the largest config's, stays at or under it on the
            calibration users. None or 1.0: the router's own routing, exactly.
        max_flops: hard per-user cap in (0, 1]: no user is routed to a config costing more
            than this fraction of the largest config's FLOPs (needs no calibration).
        penalty: an explicit :class:`canet.budget.RoutingPenalty` instead of ``budget`` and
            ``max_flops`` (calibration and tests).
    """

    def __init__(
        self,
        model: CANet,
        backend: str = "auto",
        dtype: torch.dtype | str | None = None,
        max_score_elements: int = DEFAULT_MAX_SCORE_ELEMENTS,
        *,
        budget: float | None = None,
        max_flops: float | None = None,
        penalty: RoutingPenalty | None = None,
        budget_table: BudgetTable | None = None,
    ) -> None:
        if not isinstance(model, CANet):
            raise ValueError(f"Engine needs a canet.CANet, got {type(model).__name__}")
        state = model.state_dict()
        reference = state["supernet.out.weight"]
        if reference.device.type == "meta":
            # Every backend would fail deep inside (or compute garbage from) shape-only tensors.
            raise ValueError(
                "Engine needs a model with weights; this one is on the meta device (shapes "
                "only): load its weights (e.g. canet.load_checkpoint) or move it to cpu/cuda"
            )
        self.device = reference.device
        self.dtype = reference.dtype if dtype is None else _as_dtype(dtype)
        if not self.dtype.is_floating_point:
            raise ValueError(f"Engine dtype must be a floating-point dtype, got {self.dtype}")
        if self.dtype != reference.dtype:
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        self.arch = dict(model.arch)
        self.space = model.space
        self.penalty = routing_penalty(
            model, budget, max_flops, penalty=penalty, table=budget_table
        )
        self.budget = budget
        self._model = model  # for with_budget
        self._budget_table = budget_table
        self._penalty_vector = (
            None if self.penalty is None
            else self.penalty.vector(model.flops_fractions, self.device)
        )
        self.num_items = model.num_items
        self.max_len = model.max_len
        self.backend = backends.resolve(backend, self.device, self.dtype)
        self._impl = backends.create(self.backend, self.arch, state, self.device)
        self._table = self.space.table(self.device)
        # The table is the engine's own (validated with the space): plan through the native op
        # directly when it is there, without ops.plan's per-call checks (~10 us at batch 1).
        self._native_plan = _ext.has_kernel("plan", self.device.type)
        largest = self.space.configs[self.space.largest_id]
        self._flops_largest = flops(largest, self.max_len, self.num_items)
        self.max_score_elements = max_score_elements
        # The summary of the last batch is built on first access: reading group sizes back from
        # the device would otherwise cost a host sync on every GPU forward.
        self._last_batch: tuple[Tensor, bool] | None = None
        self._last_plan: PlanSummary | None = None

    def __repr__(self) -> str:
        return (
            f"Engine(backend={self.backend!r}, dtype={self.dtype}, device={self.device}, "
            f"num_items={self.num_items}, max_len={self.max_len}, configs={len(self.space)})"
        )

    # -- public API --------------------------------------------------------------------------
    @property
    def last_config_ids(self) -> Tensor | None:
        """Config id of each user ``[B]`` (input order) of the last batch (None before one)."""
        return None if self._last_batch is None else self._last_batch[0]

    @property
    def last_plan(self) -> PlanSummary | None:
        """Routing histogram, groups and FLOPs of the last batch (None before the first)."""
        if self._last_plan is None and self._last_batch is not None:
            config_ids, routed = self._last_batch
            self._last_plan = self._summarize(self._plan(config_ids), routed)
        return self._last_plan

    def with_budget(self, budget: float | None = None, max_flops: float | None = None) -> Engine:
        """This engine under another serve-time ``budget`` / ``max_flops`` (as the constructor
        takes them): a new Engine that shares this one's backend, so its weights, packed
        copies and compiled kernels, already warm, are not built a second time. The two share
        the backend's workspaces too: like one Engine, call them from one thread at a time
        (``canet serve`` runs every batch on its one inference thread)."""
        penalty = routing_penalty(self._model, budget, max_flops, table=self._budget_table)
        other = copy.copy(self)
        other.penalty = penalty
        other.budget = budget
        other._penalty_vector = (
            None if penalty is None
            else penalty.vector(self._model.flops_fractions, self.device)
        )
        other._last_batch = None
        other._last_plan = None
        return other

    def route(self, seqs: Tensor) -> Tensor:
        """Config id per user (argmax of the router). seqs ``[B, L]`` -> ``[B]`` int64."""
        seqs = self._check(seqs)
        with torch.inference_mode():
            return self._impl.route(seqs, self._penalty_vector)

    def score(self, seqs: Tensor, config_ids: Tensor | None = None) -> Tensor:
        """Scores ``[B, N+1]`` equal to ``model.score(seqs, config_ids)``; column 0 is -inf.

        seqs ``[B, L]`` left-padded item ids; config_ids ``[B]`` or None (the router decides).

        On a GPU this call is not free of host syncs: validating ``seqs`` (and ``config_ids``)
        reads their values back to the host (``check_sequences``), which waits for the work
        queued before it, and the torch backend reads each group's size back as well.
        :meth:`capture` is the sync-free path (backends with ``CAPTURABLE``: triton): one CUDA
        graph per batch size whose inputs are not validated.
        """
        seqs = self._check(seqs)
        with torch.inference_mode():
            config_ids, routed = self._config_ids(seqs, config_ids)
            self._remember(config_ids, routed)
            return self._scores(seqs, config_ids)

    def capture(self, batch_size: int, routed: bool = True):
        """Record the whole forward for ``batch_size`` users in one CUDA graph (backends that
        plan on the device: triton). Returns a callable ``captured(seqs)`` (routed) or
        ``captured(seqs, config_ids)``; its inputs are NOT validated (validation reads values
        back to the host, which a graph cannot do), and its output buffer is reused by the
        next call."""
        if not self._impl.CAPTURABLE:
            raise backends.BackendUnavailableError(
                f"capture needs a backend that plans on the device (triton on a CUDA GPU); "
                f"this engine runs the {self.backend!r} backend on {self.device}"
            )
        return self._impl.capture(batch_size, routed=routed, penalty=self._penalty_vector)

    def recommend(
        self,
        seqs: Tensor,
        k: int = 10,
        exclude_history: bool = True,
        config_ids: Tensor | None = None,
        exclude: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-k items per user: (item ids ``[B, k]`` int64, scores ``[B, k]``), internal ids,
        best first. Padding is never recommended; with ``exclude_history`` neither are the
        items in the user's input ``seqs``; ``exclude = (rows [P], items [P])`` removes more
        (user row, item) pairs, e.g. a history longer than ``max_len``. A user with fewer than
        k candidates gets id -1 and score -inf in the remaining slots (as
        ``canet.ops.score_topk``). ``config_ids [B]``: as in :meth:`score`.

        On the native cpu backend with k <= 200, scoring and selection run fused in
        ``canet.ops.score_topk``: no ``[B, N+1]`` score matrix, equal scores rank the smaller
        id first, and a NaN score counts as -inf. Otherwise (and when the exclusions would
        not fit in ``max_score_elements``) scores are computed in user chunks of at most
        ``max_score_elements`` and selected with ``torch.topk``, whose order among equal
        scores is unspecified and which ranks NaN first.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_items:
            raise ValueError(f"k must be an int in [1, {self.num_items}], got {k!r}")
        seqs = self._check(seqs)
        if exclude is not None:
            rows, items = (t.to(self.device, torch.int64) for t in exclude)
            exclude = (rows, items)
            if rows.shape != items.shape or rows.dim() != 1:
                raise ValueError(
                    "exclude must be two 1-D tensors (rows [P], items [P]) of equal length, "
                    f"got shapes {tuple(rows.shape)} and {tuple(items.shape)}"
                )
            if rows.numel() and not (
                0 <= int(rows.min()) and int(rows.max()) < seqs.shape[0]
                and 0 <= int(items.min()) and int(items.max()) <= self.num_items
            ):
                raise ValueError(
                    f"exclude: rows must be in [0, {seqs.shape[0] - 1}] and items in "
                    f"[0, {self.num_items}]"
                )
        with torch.inference_mode():
            config_ids, routed = self._config_ids(seqs, config_ids)
            ids, scores = self._top_k(seqs, config_ids, k, exclude_history, exclude)
            self._remember(config_ids, routed)
            # A -inf (or, fused, NaN) score is no candidate: topk fills a short list with
            # excluded columns, score_topk with -inf slots. Never return their ids.
            return ids.masked_fill_(torch.isneginf(scores), -1), scores

    # -- internals -------------------------------------------------------------------------
    def _fused_top_k(self, k: int, seqs: Tensor, exclude: tuple[Tensor, Tensor] | None) -> bool:
        # Scoring and selection in one native op (no [B, N+1] matrix) where it was measured to
        # beat matmul + topk: the native CPU backend (benches/bench_engine.py). GPU backends
        # keep the dense path until a GPU run measures canet::score_topk there. The exclusion
        # table is [B, L + most extra pairs of one user]: past max_score_elements, dense.
        if not (
            self._impl.LAST_HIDDEN
            and k <= ops.SCORE_TOPK_MAX_K
            and _ext.has_kernel("score_topk", self.device.type)
            and _ext.has_kernel("routed_last_hidden", self.device.type)
        ):
            return False
        width = seqs.shape[1]
        if exclude is not None and exclude[0].numel():
            width += int(torch.bincount(exclude[0]).max())
        return seqs.shape[0] * width <= self.max_score_elements

    def _top_k(
        self,
        seqs: Tensor,
        config_ids: Tensor,
        k: int,
        exclude_history: bool,
        exclude: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        """(ids ``[B, k]``, scores ``[B, k]``) of :meth:`recommend`, fused where
        :meth:`_fused_top_k` allows, else from score chunks and ``torch.topk``."""
        if self._fused_top_k(k, seqs, exclude):
            hidden = self._impl.last_hidden(seqs, self._plan(config_ids))
            weight, bias = self._impl.output_layer()
            history = _exclusions(seqs, exclude_history, exclude)
            sizes = self._table[config_ids, 1]
            return ops.score_topk(hidden, sizes, weight, bias, history, k, check_values=False)
        chunk = max(1, self.max_score_elements // (self.num_items + 1))
        ids, values = [], []
        for start in range(0, seqs.shape[0], chunk):
            part = seqs[start : start + chunk]
            scores = self._scores(part, config_ids[start : start + chunk])
            if exclude_history:
                scores.scatter_(1, part, float("-inf"))
            if exclude is not None:
                rows, items = exclude
                inside = (rows >= start) & (rows < start + part.shape[0])
                scores[rows[inside] - start, items[inside]] = float("-inf")
            top = scores.topk(k, dim=-1)
            ids.append(top.indices)
            values.append(top.values)
        return torch.cat(ids), torch.cat(values)

    def _check(self, seqs: Tensor) -> Tensor:
        seqs = check_sequences(seqs, self.num_items, self.max_len)
        if seqs.device != self.device:
            raise ValueError(
                f"seqs must be on the engine's device {self.device}, got {seqs.device}"
            )
        return seqs

    def _scores(self, seqs: Tensor, config_ids: Tensor) -> Tensor:
        # Backends that build the plan on the device take the ids directly (no host sync).
        if self._impl.PLANS_ON_DEVICE:
            return self._impl.scores_from_ids(seqs, config_ids)
        return self._impl.scores(seqs, self._plan(config_ids))

    def _plan(self, config_ids: Tensor) -> ops.Plan:
        # Ids come from the router or check_config_ids: in range, so no range check (a sync).
        if self._native_plan:
            return ops.Plan(*torch.ops.canet.plan(config_ids, self._table, self.space.max_depth))
        return ops.plan(config_ids, self._table, check_ids=False, max_depth=self.space.max_depth)

    def _remember(self, config_ids: Tensor, routed: bool) -> None:
        self._last_batch = (config_ids, routed)
        self._last_plan = None

    def _config_ids(self, seqs: Tensor, config_ids: Tensor | None) -> tuple[Tensor, bool]:
        if config_ids is None:
            return self._impl.route(seqs, self._penalty_vector), True
        config_ids = check_config_ids(config_ids, seqs.shape[0], self.space.n_configs)
        return config_ids.to(self.device), False

    def _summarize(self, plan: ops.Plan, routed: bool) -> PlanSummary:
        offsets = plan.group_offsets.tolist()
        histogram = [0] * len(self.space)
        groups = []
        for g, config_id in enumerate(plan.group_config.tolist()):
            size = offsets[g + 1] - offsets[g]
            histogram[config_id] = size
            if size:
                config = self.space.configs[config_id]
                groups.append(GroupSpan(config_id, config, offsets[g], offsets[g + 1]))
        users = offsets[-1]
        router = self.arch["router_dim"]
        return PlanSummary(
            histogram=histogram,
            groups=groups,
            layer_active=plan.layer_active.tolist(),
            flops=batch_flops(histogram, self.space, self.max_len, self.num_items),
            flops_router=users * flops_router(self.max_len, len(self.space), router)
            if routed
            else 0,
            flops_largest=users * self._flops_largest,
            order=plan.order,
        )


def routing_penalty(
    model: CANet,
    budget: float | None = None,
    max_flops: float | None = None,
    *,
    penalty: RoutingPenalty | None = None,
    table: BudgetTable | None = None,
) -> RoutingPenalty | None:
    """The routing penalty of a serve-time ``budget`` and cap ``max_flops`` (or an explicit
    ``penalty``) for ``model``, as the Engine routes with it: None for the router's own argmax.
    ``budget`` is looked up in ``table`` (default ``model.budget_table``); BudgetError for a
    bad value, a budget below 1.0 without a table ("run `canet calibrate`"), a budget below
    the smallest achievable, or a cap below every config."""
    table = model.budget_table if table is None else table
    if penalty is not None:
        if not isinstance(penalty, RoutingPenalty):
            raise BudgetError(
                f"penalty must be a canet.budget.RoutingPenalty, got {type(penalty).__name__} "
                "(a budget or cap goes to budget= or max_flops=)"
            )
        if budget is not None or max_flops is not None:
            raise BudgetError("pass either penalty or budget/max_flops to the Engine, not both")
        return None if penalty.is_identity else penalty
    if max_flops is not None:
        max_flops = check_budget(max_flops, "max_flops")
    if budget is None:
        chosen = RoutingPenalty(0.0, max_flops)
    else:
        budget = check_budget(budget)
        if table is None:
            if budget < 1.0:
                raise BudgetError(
                    f"budget {budget:g} needs a calibration table, and this model has none "
                    "(a run trained before calibration existed, or a model built in code): "
                    "run `canet calibrate RUN_DIR --data LOG` (or pass budget_table=)"
                )
            chosen = RoutingPenalty(0.0, max_flops)
        else:
            chosen = table.penalty(budget, max_flops)
    if chosen.max_flops is not None:
        chosen.vector(model.flops_fractions)  # a cap below every config fails here
    return None if chosen.is_identity else chosen


def _exclusions(
    seqs: Tensor, exclude_history: bool, exclude: tuple[Tensor, Tensor] | None
) -> Tensor | None:
    """Items to exclude per user as one ``[B, W]`` id table (0 = nothing): the input ``seqs``
    when ``exclude_history``, then each row's ``exclude`` pairs, left-aligned and zero-padded."""
    parts = [seqs] if exclude_history else []
    if exclude is not None and exclude[0].numel():
        rows, items = exclude
        order = torch.argsort(rows, stable=True)
        rows, items = rows[order], items[order]
        counts = torch.bincount(rows, minlength=seqs.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        extra = seqs.new_zeros(seqs.shape[0], int(counts.max()))
        extra[rows, torch.arange(rows.numel(), device=rows.device) - starts[rows]] = items
        parts.append(extra)
    return torch.cat(parts, dim=1) if parts else None
