"""The vocabulary: external user/item tokens <-> the dense internal ids of a dataset.

Item ids are ``1..N`` (``0`` is padding), user ids ``0..U-1``, both assigned in sorted order of
the token strings. A checkpoint stores its :class:`Vocab` (``vocab.json``) so that a model can
be served and evaluated in external tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from canet.errors import DataFormatError

__all__ = ["Vocab"]


class Vocab:
    """External token <-> internal id. Items ``1..N`` (0 = padding), users ``0..U-1``.

    Ids are assigned by sorting tokens as strings (so they do not depend on row order).
    """

    def __init__(self, user_tokens: Sequence[str], item_tokens: Sequence[str]) -> None:
        self.user_tokens: list[str] = [str(token) for token in user_tokens]
        # item_tokens[i] is the token of item id i + 1.
        self.item_tokens_list: list[str] = [str(token) for token in item_tokens]
        self._user_index = {token: idx for idx, token in enumerate(self.user_tokens)}
        self._item_index = {token: idx + 1 for idx, token in enumerate(self.item_tokens_list)}
        if len(self._user_index) != len(self.user_tokens):
            raise ValueError("duplicate user tokens in Vocab")
        if len(self._item_index) != len(self.item_tokens_list):
            raise ValueError("duplicate item tokens in Vocab")

    @property
    def num_users(self) -> int:
        return len(self.user_tokens)

    @property
    def num_items(self) -> int:
        """Number of real items N (ids 1..N); score tensors have N + 1 columns."""
        return len(self.item_tokens_list)

    def item_ids(self, tokens: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """Map item tokens to ids.

        Returns ``(ids, unknown)``: int64 ids [k] of the known tokens in input order, and the
        tokens not in the vocabulary, in input order (with repeats), so callers can report them.
        """
        ids: list[int] = []
        unknown: list[str] = []
        for token in tokens:
            idx = self._item_index.get(str(token))
            if idx is None:
                unknown.append(str(token))
            else:
                ids.append(idx)
        return np.array(ids, dtype=np.int64), unknown

    def item_tokens(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> list[str]:
        """Map item ids (1..N) to tokens. Raises ValueError on padding or out-of-range ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        tokens = []
        for idx in ids:
            if not 1 <= int(idx) <= self.num_items:
                raise ValueError(f"item id must be in 1..{self.num_items}, got {idx}")
            tokens.append(self.item_tokens_list[int(idx) - 1])
        return tokens

    def user_id(self, token: str) -> int | None:
        """The user id of ``token``, or None if the user is unknown."""
        return self._user_index.get(str(token))

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "users": list(self.user_tokens), "items": list(self.item_tokens_list)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<vocab>") -> Vocab:
        """Inverse of :meth:`to_dict`; raises DataFormatError (naming ``source``) if malformed."""
        if not isinstance(data, Mapping):
            raise DataFormatError(
                source, None, f"vocab must be a mapping, got {type(data).__name__}"
            )
        if data.get("version") != 1:
            raise DataFormatError(
                source, None, f"vocab version must be 1, got {data.get('version')!r}"
            )
        users, items = data.get("users"), data.get("items")
        for key, value in (("users", users), ("items", items)):
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise DataFormatError(source, None, f"vocab {key!r} must be a list of strings")
        try:
            return cls(users, items)
        except ValueError as error:
            raise DataFormatError(source, None, str(error)) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str = "<vocab>") -> Vocab:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as error:
            raise DataFormatError(source, None, f"vocab is not valid JSON: {error}") from None
        return cls.from_dict(data, source)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return (
            self.user_tokens == other.user_tokens
            and self.item_tokens_list == other.item_tokens_list
        )

    def __repr__(self) -> str:
        return f"Vocab(num_users={self.num_users}, num_items={self.num_items})"
