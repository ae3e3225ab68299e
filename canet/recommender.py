"""Serving front end: external-id histories in, top-k external item ids out.

    rec = canet.Recommender.from_pretrained("runs/ml100k", backend="auto")
    rec.recommend({"alice": ["50", "172", "133"]}, k=10)
    # {"alice": [("181", 3.2), ("174", 3.1), ...]}

    rec = canet.Recommender.from_pretrained("runs/ml100k", budget=0.3)  # a compute budget

Histories are raw item tokens, so users never seen in training work. Unknown tokens are
reported (``last_unknown`` and a warning), never silently dropped; histories longer than
``max_len`` keep their most recent items. ``canet recommend RUN_DIR --input FILE -k 10 --output
recs.csv`` (:mod:`canet.cli.recommend`) is the command-line version.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .budget import check_budget, check_routed, mean_fraction
from .data import Vocab, read_interactions
from .engine import Engine, resolve_device
from .errors import DataFormatError
from .model import CANet

__all__ = ["Recommender", "read_histories"]

Histories = Sequence[Sequence[Any]] | Mapping[Any, Sequence[Any]]
Ranked = list[tuple[str, float]]


class Recommender:
    """Top-k recommendations from a trained checkpoint through ``canet.Engine``.

    Args:
        model: the trained CANet (its weights are shared with the engine, not copied; its
            train/eval mode is left as it is: the engine never runs dropout).
        vocab: external token <-> internal id mapping of the training data.
        backend: ``canet.Engine`` backend ("auto", "torch", "cpu", ...), or "model" (as in
            ``canet evaluate``: the PyTorch computation, i.e. the Engine's "torch" backend).
        fixed_config_id: route every user to this config (a fixed-config run); None = router.
        batch_size: users scored at once.
        budget: serve-time compute budget in (0, 1] (``canet.Engine``'s: the mean FLOPs per
            user as a fraction of the largest sub-network's, through ``model.budget_table``,
            which a checkpoint's calibration.json fills; ``canet calibrate`` writes one).
        max_flops: hard per-user cap in (0, 1] (as in ``canet.Engine``).
        Neither applies to a fixed-config run (BudgetError).
    """

    def __init__(
        self,
        model: CANet,
        vocab: Vocab,
        backend: str = "auto",
        fixed_config_id: int | None = None,
        batch_size: int = 512,
        budget: float | None = None,
        max_flops: float | None = None,
    ) -> None:
        if vocab.num_items != model.num_items:
            raise ValueError(
                f"vocab has {vocab.num_items} items but the model {model.num_items}"
            )
        if budget is not None or max_flops is not None:
            check_routed(fixed_config_id, "a budget or max_flops")
        self.model = model  # its mode is the caller's: the engine runs its own eval copy
        self.vocab = vocab
        # "model" means PyTorch's model.score in `canet evaluate`; the Engine's torch backend
        # is that computation (equal scores, tested), so both commands accept the same names.
        self.engine = Engine(model, backend="torch" if backend == "model" else backend,
                             budget=budget, max_flops=max_flops)
        self.fixed_config_id = fixed_config_id
        self.batch_size = batch_size
        self.max_len = model.max_len
        self.last_unknown: dict[Any, list[str]] = {}
        self.last_config_ids: dict[Any, int] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        backend: str = "auto",
        device: str = "cpu",
        budget: float | None = None,
        max_flops: float | None = None,
    ) -> Recommender:
        """Load a run directory (its ``best/``) or a checkpoint directory, with its
        calibration table when it has one (``budget`` needs it for budgets below 1)."""
        from .checkpoint import load_checkpoint

        # Checked before loading: an unavailable CUDA device was an AssertionError from torch.
        device = resolve_device(device)
        if budget is not None:
            check_budget(budget)
        if max_flops is not None:
            check_budget(max_flops, "max_flops")
        loaded = load_checkpoint(path)
        model = loaded.model.to(device).eval()
        fixed = loaded.config.fixed_config_id(model.space)
        return cls(model, loaded.vocab, backend=backend, fixed_config_id=fixed, budget=budget,
                   max_flops=max_flops)

    def with_budget(self, budget: float | None = None,
                    max_flops: float | None = None) -> Recommender:
        """This recommender under another serve-time ``budget`` / ``max_flops``: shares the
        model, the vocabulary and the engine's backend (:meth:`canet.Engine.with_budget`), so
        nothing is loaded, copied or warmed up again. BudgetError as the constructor."""
        if budget is not None or max_flops is not None:
            check_routed(self.fixed_config_id, "a budget or max_flops")
        other = copy.copy(self)
        other.engine = self.engine.with_budget(budget, max_flops)
        other.last_unknown = {}
        other.last_config_ids = {}
        return other

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def last_flops_fraction(self) -> float | None:
        """Mean FLOPs per user of the last :meth:`recommend` call, as a fraction of the largest
        sub-network's (router excluded); None when it routed no user."""
        if not self.last_config_ids:
            return None
        ids = torch.tensor(list(self.last_config_ids.values()), dtype=torch.int64)
        return mean_fraction(ids, self.model.flops_fractions)

    def recommend(
        self,
        histories: Histories,
        k: int = 10,
        exclude_history: bool = True,
        on_empty: str = "error",
    ) -> list[Ranked] | dict[Any, Ranked]:
        """Top-k ``(item token, score)`` per history, best first.

        Args:
            histories: a list of histories (each a list of item tokens, oldest first) or a
                dict user -> history; tokens are compared as strings.
            k: items per user, 1..num_items. Fewer come back when exclusion leaves fewer.
            exclude_history: never recommend an item of the user's (whole) history.
            on_empty: what to do with a history with no known item: "error" (ValueError
                naming it) or "skip" (that user gets an empty list).

        Returns a list (for a list input) or a dict with the same keys (for a dict input).
        Unknown tokens per user are in ``last_unknown`` (and reported with a warning); the
        config each user was routed to is in ``last_config_ids``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.vocab.num_items:
            raise ValueError(f"k must be an int in [1, {self.vocab.num_items}], got {k!r}")
        if on_empty not in ("error", "skip"):
            raise ValueError(f"on_empty must be 'error' or 'skip', got {on_empty!r}")
        if isinstance(histories, Mapping):
            keys, sequences = list(histories.keys()), list(histories.values())
        elif isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
            raise ValueError(
                "histories must be a list of item-token lists or a dict user -> list, got "
                f"{type(histories).__name__}"
            )
        else:
            keys, sequences = list(range(len(histories))), list(histories)
        encoded: dict[Any, np.ndarray] = {}
        self.last_unknown = {}
        for key, history in zip(keys, sequences, strict=True):
            if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
                raise ValueError(
                    f"history of user {key!r} must be a list of item tokens, got "
                    f"{type(history).__name__}"
                )
            ids, unknown = self.vocab.item_ids(str(token) for token in history)
            if unknown:
                self.last_unknown[key] = unknown
            if len(ids) == 0:
                if on_empty == "error":
                    raise ValueError(
                        f"history of user {key!r} has no item known to the model "
                        f"({len(history)} token(s), unknown: {unknown[:5]})"
                    )
                continue
            encoded[key] = ids
        if self.last_unknown:
            count = sum(len(v) for v in self.last_unknown.values())
            warnings.warn(
                f"{count} unknown item token(s) in {len(self.last_unknown)} history(ies) were "
                "ignored (see Recommender.last_unknown)",
                UserWarning,
                stacklevel=2,
            )
        with torch.inference_mode():
            ranked = self._rank(encoded, k, exclude_history)
        results = {key: ranked.get(key, []) for key in keys}
        return results if isinstance(histories, Mapping) else [results[key] for key in keys]

    def _rank(
        self, encoded: dict[Any, np.ndarray], k: int, exclude_history: bool
    ) -> dict[Any, Ranked]:
        keys = list(encoded)
        out: dict[Any, Ranked] = {}
        self.last_config_ids = {}
        device = self.engine.device
        for first in range(0, len(keys), self.batch_size):
            chunk = keys[first : first + self.batch_size]
            seqs = torch.zeros(len(chunk), self.max_len, dtype=torch.int64)
            for row, key in enumerate(chunk):
                recent = encoded[key][-self.max_len :]
                seqs[row, self.max_len - len(recent) :] = torch.from_numpy(recent)
            seqs = seqs.to(device)
            config_ids = (
                None if self.fixed_config_id is None
                else torch.full((len(chunk),), self.fixed_config_id, device=device)
            )
            exclude = None
            if exclude_history:  # the whole history, also what is older than max_len
                rows = torch.cat([
                    torch.full((len(encoded[key]),), row, dtype=torch.int64)
                    for row, key in enumerate(chunk)
                ])
                items = torch.from_numpy(np.concatenate([encoded[key] for key in chunk]))
                exclude = (rows, items)
            top_ids, top_values = self.engine.recommend(
                seqs, k, exclude_history=False, config_ids=config_ids, exclude=exclude
            )
            chosen = self.engine.last_config_ids
            for row, key in enumerate(chunk):
                kept = [
                    (i, v)
                    for i, v in zip(top_ids[row].tolist(), top_values[row].tolist(), strict=True)
                    if i > 0
                ]
                tokens = self.vocab.item_tokens([i for i, _ in kept])
                out[key] = [(t, v) for t, (_, v) in zip(tokens, kept, strict=True)]
                self.last_config_ids[key] = int(chosen[row])
        return out


def read_histories(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """User -> item tokens (oldest first) from a JSON file (a list of histories, or a dict
    user -> history) or from an interaction log in any supported format."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            # A UTF-8 byte-order mark (Windows editors write one) is accepted, as by the logs.
            head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    except FileNotFoundError:
        raise DataFormatError(path, None, "file not found") from None
    except OSError as error:
        raise DataFormatError(path, None, f"cannot read: {error.strerror or error}") from None
    if path.endswith(".json") or head[:1] in (b"[", b"{"):
        try:
            with open(path, encoding="utf-8-sig") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            line = getattr(error, "lineno", None)
            raise DataFormatError(
                path, line, f"expected JSON (a list of histories or a dict user -> history): "
                f"{getattr(error, 'msg', error)}"
            ) from None
        if isinstance(data, list):
            data = {str(index): history for index, history in enumerate(data)}
        if not isinstance(data, dict):
            raise DataFormatError(
                path, None, f"expected a JSON list or object, got {type(data).__name__}"
            )
        histories = {}
        for user, history in data.items():
            if not isinstance(history, list) or not all(
                isinstance(t, (str, int)) and not isinstance(t, bool) for t in history
            ):
                raise DataFormatError(
                    path, None, f"history of user {str(user)[:60]!r} must be a list of item ids "
                    f"(strings or integers), got {json.dumps(history)[:60]}"
                )
            histories[str(user)] = [str(t) for t in history]
        if not histories:
            raise DataFormatError(path, None, "no histories in the file")
        return histories
    log = read_interactions(path)
    order = np.lexsort((np.arange(len(log)), log.timestamps))  # by time, ties in file order
    histories: dict[str, list[str]] = {}
    for index in order:
        histories.setdefault(str(log.users[index]), []).append(str(log.items[index]))
    return histories
