"""Interaction logs: reading, id remapping, leave-one-out splits and batching.

Pipeline::

    log = read_interactions("ml-100k.inter")          # external tokens, any supported format
    data = build_dataset(log, max_len=50)              # dense ids, per-user sequences, splits
    for seqs, targets in data.train_batches(256, generator):   # [B, L] int64 each
        ...
    for users, seqs, targets in data.eval_batches("test", 512):
        ...

Conventions used everywhere in canet:

* Item ids are ``1..num_items``; ``0`` is padding. User ids are ``0..num_users-1``.
* Sequences are left-padded: the most recent item is at position ``L-1``.
* Leave-one-out: per user (sorted by timestamp, ties kept in file order) the last item is the
  test target, the second-to-last the validation target, the rest the training prefix.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from canet.errors import ConfigError, DataFormatError

__all__ = [
    "FORMATS",
    "InteractionLog",
    "SequenceData",
    "Vocab",
    "build_dataset",
    "detect_format",
    "read_interactions",
    "synthetic_log",
]

FORMATS = ("atomic", "sasrec", "udata", "ratings_dat", "csv")

# Lower-cased header names recognised without a column_map (covers userID/itemID too).
_USER_COLUMNS = ("user_id", "userid", "user")
_ITEM_COLUMNS = ("item_id", "itemid", "item")
_TIME_COLUMNS = ("timestamp",)
_ATOMIC_FIELD = re.compile(r"^[^:\s]+:(token|float|token_seq|float_seq)$")
_CSV_DELIMITERS = (",", "\t", ";")
_SHOWN_CHARS = 60  # how much of an offending line/value goes into an error message


# --------------------------------------------------------------------------------------------
# Interaction log
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InteractionLog:
    """Raw interactions with external tokens, in file order.

    Attributes:
        users: object array [n] of user tokens (``str``).
        items: object array [n] of item tokens (``str``).
        timestamps: float64 array [n]; the row index when the format has no timestamps.
        path: the file read (or a description such as ``"<synthetic>"``).
        format: one of :data:`FORMATS` or ``"synthetic"``.
        has_timestamps: False when ``timestamps`` is only file order.
        meta: free-form extra information (e.g. the behaviour kind of synthetic users).
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    path: str
    format: str
    has_timestamps: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.users)
        if len(self.items) != n or len(self.timestamps) != n:
            raise ValueError(
                f"InteractionLog columns differ in length: users={n}, items={len(self.items)}, "
                f"timestamps={len(self.timestamps)}"
            )

    def __len__(self) -> int:
        return len(self.users)


def _show(text: str) -> str:
    """A short printable rendering of an offending value for an error message."""
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return repr(text)


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, decoded line without its line terminator)``.

    Decoding is per line so that a bad byte is reported with its line number; a UTF-8 byte
    order mark at the start of the file is dropped.
    """
    try:
        handle = open(path, "rb")  # noqa: SIM115 - open errors are mapped before `with`
    except FileNotFoundError:
        raise DataFormatError(path, None, "file not found") from None
    except IsADirectoryError:
        raise DataFormatError(path, None, "is a directory, expected an interaction file") from None
    except OSError as error:
        raise DataFormatError(path, None, f"cannot open file: {error.strerror or error}") from None
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad_byte = raw[error.start]
                    raise DataFormatError(
                        path,
                        number,
                        f"not UTF-8 text: byte 0x{bad_byte:02x} at column {error.start + 1}",
                    ) from None
                if number == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                yield number, text
        except IsADirectoryError:
            raise DataFormatError(
                path, None, "is a directory, expected an interaction file"
            ) from None
        except OSError as error:
            raise DataFormatError(
                path, None, f"cannot read file: {error.strerror or error}"
            ) from None


def _first_content_line(path: str) -> tuple[int, str]:
    for number, text in _iter_lines(path):
        if text.strip():
            return number, text
    raise DataFormatError(path, None, "file is empty (no non-blank line)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _sniff_delimiter(header: str) -> str | None:
    counts = {delimiter: header.count(delimiter) for delimiter in _CSV_DELIMITERS}
    best = max(_CSV_DELIMITERS, key=lambda delimiter: counts[delimiter])
    return best if counts[best] > 0 else None


def _header_names(header: str, delimiter: str | None) -> list[str]:
    fields = header.split(delimiter) if delimiter else header.split()
    return [name.strip().strip('"').strip("'").strip().lower() for name in fields]


def detect_format(path: str | os.PathLike[str], column_map: Mapping[str, str] | None = None) -> str:
    """Guess the format of an interaction file from its first non-blank line (never its name).

    Rules, in order: ``::``-separated -> ``ratings_dat``; a tab-separated typed header
    (``name:token``/``name:float``...) -> ``atomic``; a header naming a user or item column
    (built-in names or ``column_map``) -> ``csv``; 4 whitespace-separated fields with numeric
    rating and timestamp -> ``udata``; 2 fields -> ``sasrec``. Raises DataFormatError otherwise.
    """
    path = os.fspath(path)
    number, line = _first_content_line(path)
    if "::" in line:
        return "ratings_dat"
    tab_fields = line.split("\t")
    if all(_ATOMIC_FIELD.match(name.strip()) for name in tab_fields):
        return "atomic"
    known = set(_USER_COLUMNS) | set(_ITEM_COLUMNS)
    if column_map:
        known |= {str(name).lower() for name in column_map.values()}
    if known & set(_header_names(line, _sniff_delimiter(line))):
        return "csv"
    fields = line.split()
    if len(fields) == 4 and _is_number(fields[2]) and _is_number(fields[3]):
        return "udata"
    if len(fields) == 2:
        return "sasrec"
    raise DataFormatError(
        path,
        number,
        "cannot detect the format: expected a RecBole atomic header (user_id:token...), a CSV "
        "header with user/item columns, 'user item' (sasrec), 'user<TAB>item<TAB>rating<TAB>"
        f"timestamp' (u.data) or 'user::item::rating::timestamp'; got {_show(line)}",
    )


class _Columns:
    """Accumulates parsed rows and validates tokens/timestamps with file and line context."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.users: list[str] = []
        self.items: list[str] = []
        self.timestamps: list[float] = []

    def add(self, number: int, user: str, item: str, timestamp: str | None) -> None:
        if not user:
            raise DataFormatError(self.path, number, "empty user token")
        if not item:
            raise DataFormatError(self.path, number, "empty item token")
        if timestamp is None:
            value = float(len(self.timestamps))
        else:
            try:
                value = float(timestamp)
            except ValueError:
                raise DataFormatError(
                    self.path, number, f"timestamp {_show(timestamp)} is not a number"
                ) from None
            if not math.isfinite(value):
                raise DataFormatError(
                    self.path, number, f"timestamp {_show(timestamp)} is not a finite number"
                )
        self.users.append(user)
        self.items.append(item)
        self.timestamps.append(value)

    def finish(self, fmt: str, has_timestamps: bool, after_header: bool) -> InteractionLog:
        if not self.users:
            what = "no interaction rows after the header" if after_header else "file is empty"
            raise DataFormatError(self.path, None, what)
        return InteractionLog(
            users=np.array(self.users, dtype=object),
            items=np.array(self.items, dtype=object),
            timestamps=np.array(self.timestamps, dtype=np.float64),
            path=self.path,
            format=fmt,
            has_timestamps=has_timestamps,
        )


def _wrong_field_count(
    path: str, number: int, expected: str, got: int, line: str
) -> DataFormatError:
    return DataFormatError(path, number, f"expected {expected}, got {got} field(s): {_show(line)}")


def _read_sasrec(path: str) -> InteractionLog:
    columns = _Columns(path)
    for number, line in _iter_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise _wrong_field_count(path, number, "2 fields 'user item'", len(fields), line)
        columns.add(number, fields[0], fields[1], None)
    return columns.finish("sasrec", has_timestamps=False, after_header=False)


def _read_udata(path: str) -> InteractionLog:
    columns = _Columns(path)
    for number, line in _iter_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise _wrong_field_count(
                path, number, "4 fields 'user item rating timestamp'", len(fields), line
            )
        columns.add(number, fields[0], fields[1], fields[3])
    return columns.finish("udata", has_timestamps=True, after_header=False)


def _read_ratings_dat(path: str) -> InteractionLog:
    columns = _Columns(path)
    for number, line in _iter_lines(path):
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != 4:
            raise _wrong_field_count(
                path,
                number,
                "4 '::'-separated fields 'user::item::rating::timestamp'",
                len(fields),
                line,
            )
        columns.add(number, fields[0].strip(), fields[1].strip(), fields[3])
    return columns.finish("ratings_dat", has_timestamps=True, after_header=False)


def _find_column(
    path: str,
    number: int,
    names: Sequence[str],
    role: str,
    mapped: str | None,
    candidates: Sequence[str],
    required: bool,
) -> int | None:
    """Index of the column for ``role`` in a lower-cased header, or None if optional+absent."""
    wanted = [mapped.lower()] if mapped is not None else list(candidates)
    for candidate in wanted:
        if candidate in names:
            return names.index(candidate)
    if required or mapped is not None:
        raise DataFormatError(
            path,
            number,
            f"header has no {role} column: expected one of {wanted}, got columns {list(names)}",
        )
    return None


def _header_columns(
    path: str,
    number: int,
    names: Sequence[str],
    column_map: Mapping[str, str],
    user_names: Sequence[str],
    item_names: Sequence[str],
) -> tuple[int, int, int | None]:
    """(user, item, timestamp or None) column indices of a lower-cased header."""
    user = _find_column(path, number, names, "user", column_map.get("user"), user_names, True)
    item = _find_column(path, number, names, "item", column_map.get("item"), item_names, True)
    time = _find_column(
        path, number, names, "timestamp", column_map.get("timestamp"), _TIME_COLUMNS, False
    )
    return user, item, time


def _read_atomic(path: str, column_map: Mapping[str, str]) -> InteractionLog:
    lines = _iter_lines(path)
    header_number, header = next(
        ((number, text) for number, text in lines if text.strip()), (None, None)
    )
    if header_number is None or header is None:
        raise DataFormatError(path, None, "file is empty (no non-blank line)")
    header_fields = header.split("\t")
    for name in header_fields:
        if not _ATOMIC_FIELD.match(name.strip()):
            raise DataFormatError(
                path,
                header_number,
                f"expected a RecBole atomic header field 'name:type' (type token/float/"
                f"token_seq/float_seq), got {_show(name)}",
            )
    names = [name.strip().split(":", 1)[0].lower() for name in header_fields]
    user_col, item_col, time_col = _header_columns(
        path, header_number, names, column_map, ("user_id",), ("item_id",)
    )
    width = len(header_fields)
    columns = _Columns(path)
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise _wrong_field_count(
                path, number, f"{width} tab-separated fields as in the header", len(fields), line
            )
        columns.add(
            number,
            fields[user_col].strip(),
            fields[item_col].strip(),
            None if time_col is None else fields[time_col],
        )
    return columns.finish("atomic", has_timestamps=time_col is not None, after_header=True)


def _read_csv(path: str, column_map: Mapping[str, str]) -> InteractionLog:
    _, first_line = _first_content_line(path)
    delimiter = _sniff_delimiter(first_line)
    line_numbers: list[int] = []

    def texts() -> Iterator[str]:
        for number, text in _iter_lines(path):
            line_numbers.append(number)
            yield text

    if delimiter is None:
        # A whitespace-separated header: no quoting, split like the other plain formats.
        def split_rows() -> Iterator[tuple[int, list[str]]]:
            for text in texts():
                yield line_numbers[-1], text.split()

        rows: Iterator[tuple[int, list[str]]] = split_rows()
    else:
        reader = csv.reader(texts(), delimiter=delimiter, skipinitialspace=True)

        def csv_rows() -> Iterator[tuple[int, list[str]]]:
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as error:
                    raise DataFormatError(
                        path, line_numbers[-1] if line_numbers else None, f"bad CSV: {error}"
                    ) from None
                yield line_numbers[-1], row

        rows = csv_rows()

    header_number, header = next(
        ((number, row) for number, row in rows if any(name.strip() for name in row)),
        (None, None),
    )
    if header_number is None or header is None:
        raise DataFormatError(path, None, "file is empty (no non-blank line)")
    names = [name.strip().lower() for name in header]
    user_col, item_col, time_col = _header_columns(
        path, header_number, names, column_map, _USER_COLUMNS, _ITEM_COLUMNS
    )
    width = len(header)
    columns = _Columns(path)
    shown = "tab" if delimiter == "\t" else repr(delimiter) if delimiter else "whitespace"
    for number, row in rows:
        if not row or not any(value.strip() for value in row):
            continue
        if len(row) != width:
            raise _wrong_field_count(
                path,
                number,
                f"{width} {shown}-separated fields as in the header",
                len(row),
                (delimiter or " ").join(row),
            )
        columns.add(
            number,
            row[user_col].strip(),
            row[item_col].strip(),
            None if time_col is None else row[time_col],
        )
    return columns.finish("csv", has_timestamps=time_col is not None, after_header=True)


def read_interactions(
    path: str | os.PathLike[str],
    format: str | None = None,
    column_map: Mapping[str, str] | None = None,
) -> InteractionLog:
    """Read an interaction file into an :class:`InteractionLog`.

    Args:
        path: the file.
        format: one of :data:`FORMATS`; ``None`` detects it from the content
            (see :func:`detect_format`).
        column_map: for ``csv``/``atomic`` only: ``{"user": ..., "item": ..., "timestamp": ...}``
            header names (case-insensitive; for atomic, the name without ``:type``).

    Raises:
        DataFormatError: on every problem with the file (missing, empty, undetectable format,
            malformed line, non-numeric timestamp, header without user/item column), naming
            the file and, where there is one, the line.
        ConfigError: on a bad ``format`` or ``column_map`` argument.
    """
    path = os.fspath(path)
    mapping = dict(column_map or {})
    unknown_roles = set(mapping) - {"user", "item", "timestamp"}
    if unknown_roles:
        raise ConfigError(
            f"column_map keys must be 'user', 'item', 'timestamp'; got {sorted(unknown_roles)}"
        )
    if not all(isinstance(name, str) and name for name in mapping.values()):
        raise ConfigError(f"column_map values must be non-empty strings; got {mapping}")
    if format is None:
        format = detect_format(path, mapping)
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; expected one of {FORMATS} or None")
    if mapping and format not in ("csv", "atomic"):
        raise ConfigError(f"column_map applies to 'csv' and 'atomic' files, not {format!r}")
    if format == "atomic":
        return _read_atomic(path, mapping)
    if format == "csv":
        return _read_csv(path, mapping)
    if format == "sasrec":
        return _read_sasrec(path)
    if format == "udata":
        return _read_udata(path)
    return _read_ratings_dat(path)


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Sequences, splits, batches
# --------------------------------------------------------------------------------------------

_SPLITS = ("valid", "test")


class SequenceData:
    """Per-user item sequences with a leave-one-out split and SASRec-style training windows.

    Storage: one flat int64 array ``items`` (ids 1..N, users contiguous, each user's items in
    time order) and ``offsets`` [U + 1]; user ``u`` owns ``items[offsets[u]:offsets[u + 1]]``.
    Training samples are ``(user, end)`` index pairs; windows are gathered when batching.

    Split, per user with n >= 3 interactions: test target ``seq[n-1]`` (input ``seq[:n-1]``),
    validation target ``seq[n-2]`` (input ``seq[:n-2]``), training prefix ``seq[:n-2]``.
    Users with n < 3: every item is training; they have no valid/test target.

    Training windows over a prefix of length P >= 2: the first window ends at the prefix end
    (targets = the last ``min(L, P-1)`` prefix items, inputs = the item before each target);
    each further window ends ``L`` items earlier, until no target with an input is left. So each
    prefix item except the first is a target exactly once.
    """

    def __init__(
        self,
        items: np.ndarray,
        offsets: np.ndarray,
        vocab: Vocab,
        max_len: int,
        path: str = "<memory>",
        stats: Mapping[str, int] | None = None,
    ) -> None:
        self.items = np.ascontiguousarray(items, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.vocab = vocab
        self.max_len = int(max_len)
        self.path = path
        self.num_users = vocab.num_users
        self.num_items = vocab.num_items
        if len(self.offsets) != self.num_users + 1 or self.offsets[-1] != len(self.items):
            raise ValueError("offsets do not match the vocabulary / item array")
        self.starts = self.offsets[:-1]
        self.lengths = np.diff(self.offsets)
        has_eval = self.lengths >= 3
        self._eval_users = np.flatnonzero(has_eval).astype(np.int64)
        self.train_lengths = np.where(has_eval, self.lengths - 2, self.lengths)
        self.sample_users, self.sample_ends = self._training_samples()
        self.stats: dict[str, int] = {
            "num_interactions": len(self.items),
            "num_users": int(self.num_users),
            "num_items": int(self.num_items),
            "num_eval_users": len(self._eval_users),
            "num_train_only_users": int(self.num_users - len(self._eval_users)),
            "num_train_samples": len(self.sample_users),
        }
        if stats:
            self.stats.update({key: int(value) for key, value in stats.items()})

    def _training_samples(self) -> tuple[np.ndarray, np.ndarray]:
        prefix = self.train_lengths
        # Windows needed to cover the P - 1 targets of a prefix, L targets per window.
        windows = np.where(prefix >= 2, (prefix - 1 + self.max_len - 1) // self.max_len, 0)
        users = np.repeat(np.arange(self.num_users, dtype=np.int64), windows)
        first = np.cumsum(windows) - windows  # index of each user's first window
        window_rank = np.arange(len(users), dtype=np.int64) - np.repeat(first, windows)
        ends = self.starts[users] + prefix[users] - window_rank * self.max_len
        return users, ends

    # -- access -----------------------------------------------------------------------------

    def user_sequence(self, user: int) -> np.ndarray:
        """All items of ``user`` in time order (a view, int64 [n])."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def eval_users(self, split: str) -> np.ndarray:
        """Users (int64 [k], ascending) that have a ``split`` target, i.e. >= 3 interactions."""
        self._check_split(split)
        return self._eval_users

    def history(self, split: str, user: int) -> np.ndarray:
        """The full input history of ``user`` for ``split`` ("train"/"valid": the training
        prefix; "test": prefix + validation item), not truncated to ``max_len``."""
        if split not in ("train", *_SPLITS):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        start = self.offsets[user]
        end = start + self.train_lengths[user]
        if split == "test" and self.lengths[user] >= 3:
            end += 1
        return self.items[start:end]

    def history_pairs(self, split: str, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) index pairs of the full input histories of ``users`` [B] for ``split``,
        for excluding already-seen items beyond the ``max_len`` window from a [B, N+1] score
        matrix (see ``canet.metrics.exclude_pairs``). Returns two int64 tensors [K]."""
        self._check_split(split)
        user_list = users.detach().cpu().reshape(-1).tolist()
        parts = [self.history(split, user) for user in user_list]
        rows = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])
        cols = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))

    # -- batching ---------------------------------------------------------------------------

    def _windows(self, ends: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Items at flat positions ``[end - L, end)`` clipped to ``>= start``, left-padded.

        ends, starts: int64 [B]. Returns int64 [B, L]; column L-1 holds position end - 1.
        """
        positions = ends[:, None] - self.max_len + np.arange(self.max_len, dtype=np.int64)[None, :]
        inside = positions >= starts[:, None]
        gathered = self.items[np.where(inside, positions, 0)]
        return np.where(inside, gathered, 0)

    def num_train_batches(self, batch_size: int, drop_last: bool = False) -> int:
        count = len(self.sample_users)
        return count // batch_size if drop_last else -(-count // batch_size)

    def train_batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(seqs [B, L] int64, targets [B, L] int64)``; ``targets[b, j]`` is the item
        following ``seqs[b, j]``; both are 0 at padding positions. Order is a permutation drawn
        from ``generator`` (the global torch RNG if None) when ``shuffle``."""
        _check_batch_size(batch_size)
        count = len(self.sample_users)
        if shuffle:
            order = torch.randperm(count, generator=generator).numpy()
        else:
            order = np.arange(count)
        stop = count - count % batch_size if drop_last else count
        for first in range(0, stop, batch_size):
            chosen = order[first : first + batch_size]
            users, ends = self.sample_users[chosen], self.sample_ends[chosen]
            starts = self.starts[users]
            seqs = self._windows(ends - 1, starts)
            targets = self._windows(ends, starts + 1)
            yield torch.from_numpy(seqs), torch.from_numpy(targets)

    def eval_batches(
        self, split: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(users [B] int64, seqs [B, L] int64, targets [B] int64)`` for every user
        with a ``split`` target, in ascending user order. ``seqs`` is the last L items of the
        split's input history, left-padded."""
        self._check_split(split)
        _check_batch_size(batch_size)
        users_all = self._eval_users
        for first in range(0, len(users_all), batch_size):
            users = users_all[first : first + batch_size]
            starts = self.starts[users]
            input_ends = starts + self.lengths[users] - (2 if split == "valid" else 1)
            seqs = self._windows(input_ends, starts)
            targets = self.items[input_ends]
            yield torch.from_numpy(users.copy()), torch.from_numpy(seqs), torch.from_numpy(targets)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def __repr__(self) -> str:
        return (
            f"SequenceData(users={self.num_users}, items={self.num_items}, "
            f"interactions={len(self.items)}, max_len={self.max_len}, path={self.path!r})"
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _factorize(tokens: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes int64 [n] into the sorted list of distinct tokens."""
    distinct = sorted(set(tokens.tolist()))
    index = {token: code for code, token in enumerate(distinct)}
    codes = np.fromiter(
        (index[token] for token in tokens.tolist()), dtype=np.int64, count=len(tokens)
    )
    return codes, distinct


def build_dataset(
    log: InteractionLog, max_len: int, min_user_inter: int = 0, min_item_inter: int = 0
) -> SequenceData:
    """Filter, remap and split an interaction log.

    Filters (RecBole-style "k-core"): users with fewer than ``min_user_inter`` and items with
    fewer than ``min_item_inter`` interactions are removed, repeatedly until no more rows are
    removed (removing an item can push a user below the threshold and vice versa).

    Ids: users 0..U-1 and items 1..N in sorted order of their token strings (independent of row
    order). Each user's items are stably sorted by timestamp: ties keep file order.

    Raises:
        ConfigError: bad ``max_len``/threshold values.
        DataFormatError: (``log.path``, no line) when no user has >= 3 interactions left.
    """
    max_len = _check_count("max_len", max_len, 1)
    min_user_inter = _check_count("min_user_inter", min_user_inter, 0)
    min_item_inter = _check_count("min_item_inter", min_item_inter, 0)
    user_codes, user_tokens = _factorize(np.asarray(log.users, dtype=object))
    item_codes, item_tokens = _factorize(np.asarray(log.items, dtype=object))
    timestamps = np.asarray(log.timestamps, dtype=np.float64)

    keep = np.ones(len(user_codes), dtype=bool)
    while True:
        user_counts = np.bincount(user_codes[keep], minlength=len(user_tokens))
        item_counts = np.bincount(item_codes[keep], minlength=len(item_tokens))
        new_keep = (
            keep
            & (user_counts[user_codes] >= min_user_inter)
            & (item_counts[item_codes] >= min_item_inter)
        )
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep

    rows = np.flatnonzero(keep)
    kept_users = np.unique(user_codes[rows])
    kept_items = np.unique(item_codes[rows])
    # Compress codes to dense ids while keeping the sorted-token order.
    user_ids = np.searchsorted(kept_users, user_codes[rows])
    item_ids = np.searchsorted(kept_items, item_codes[rows]) + 1
    order = np.lexsort((rows, timestamps[rows], user_ids))  # last key is the primary one

    vocab = Vocab([user_tokens[c] for c in kept_users], [item_tokens[c] for c in kept_items])
    counts = np.bincount(user_ids, minlength=vocab.num_users)
    if not np.any(counts >= 3):
        raise DataFormatError(
            log.path,
            None,
            f"no user has at least 3 interactions after filtering (min_user_inter="
            f"{min_user_inter}, min_item_inter={min_item_inter}; {len(rows)} of {len(log)} rows "
            "kept); leave-one-out needs a training item, a validation and a test target",
        )
    offsets = np.zeros(vocab.num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return SequenceData(
        items=item_ids[order].astype(np.int64),
        offsets=offsets,
        vocab=vocab,
        max_len=max_len,
        path=log.path,
        stats={"num_filtered_interactions": int(len(log) - len(rows))},
    )


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

SYNTHETIC_KINDS = ("cycle", "markov", "second_order")


def synthetic_log(
    num_users: int,
    num_items: int,
    seed: int,
    seq_len: tuple[int, int] = (20, 60),
    kind_fractions: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    num_clusters: int = 10,
    noise: float = 0.05,
) -> InteractionLog:
    """A seeded synthetic log whose users differ in how hard their next item is to predict.

    Each user gets one behaviour kind (drawn with ``kind_fractions``):

    * ``cycle`` (easy): repeats a private cycle of 2-4 random items; the last item alone
      determines the next, so a tiny model suffices.
    * ``markov`` (medium): items are split into ``num_clusters`` clusters; the next item's
      cluster follows a shared first-order transition table over clusters (each cluster has two
      likely successors), the item is uniform within that cluster.
    * ``second_order`` (hard): next item = ``perm[(prev + 3 * prev2) % num_items]`` for a shared
      random permutation ``perm``, i.e. depends on the last *two* items; the first-order
      statistics look nearly uniform.

    With probability ``noise`` any step is replaced by a uniform random item. Sequence lengths
    are uniform in ``seq_len`` (inclusive). Tokens are ``"u{index}"`` / ``"i{index}"``;
    timestamps increase within a user. ``log.meta["user_kind"]`` maps user token -> kind.
    """
    num_users = _check_count("num_users", num_users, 1)
    num_items = _check_count("num_items", num_items, 4)
    low, high = int(seq_len[0]), int(seq_len[1])
    if not 3 <= low <= high:
        raise ConfigError(f"seq_len must satisfy 3 <= low <= high, got {seq_len!r}")
    fractions = np.asarray(kind_fractions, dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or fractions.sum() <= 0:
        raise ConfigError(f"kind_fractions must be 3 non-negative weights, got {kind_fractions!r}")
    num_clusters = max(1, min(_check_count("num_clusters", num_clusters, 1), num_items))
    if not 0.0 <= noise <= 1.0:
        raise ConfigError(f"noise must be in [0, 1], got {noise!r}")

    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=num_users, p=fractions / fractions.sum())
    lengths = rng.integers(low, high + 1, size=num_users)
    cluster_of = rng.permutation(num_items) % num_clusters
    cluster_members = [np.flatnonzero(cluster_of == c) for c in range(num_clusters)]
    successors = np.stack(
        [rng.choice(num_clusters, size=2, replace=num_clusters < 2) for _ in range(num_clusters)]
    )
    permutation = rng.permutation(num_items)

    sequences: list[np.ndarray] = []
    for user in range(num_users):
        length = int(lengths[user])
        kind = kinds[user]
        # Noise is drawn up front and applied inside the generators so that the Markov and
        # second-order rules continue from the noisy item, as a real user would.
        noisy = rng.random(length) < noise
        random_items = rng.integers(num_items, size=length)
        if kind == 0:
            cycle = rng.choice(num_items, size=int(rng.integers(2, 5)), replace=False)
            seq = np.resize(np.roll(cycle, -int(rng.integers(len(cycle)))), length)
            seq = np.where(noisy, random_items, seq).astype(np.int64)
        elif kind == 1:
            seq = np.empty(length, dtype=np.int64)
            picks = rng.random(length)
            cluster = int(rng.integers(num_clusters))
            for t in range(length):
                members = cluster_members[cluster]
                item = random_items[t] if noisy[t] else members[int(picks[t] * len(members))]
                seq[t] = item
                cluster = int(successors[cluster_of[item], 0 if picks[t] < 0.7 else 1])
        else:
            seq = random_items.astype(np.int64)  # the first two items are random
            for t in range(2, length):
                if not noisy[t]:
                    seq[t] = permutation[(seq[t - 1] + 3 * seq[t - 2]) % num_items]
        sequences.append(seq)

    flat_items = np.concatenate(sequences)
    user_index = np.repeat(np.arange(num_users), lengths)
    within = np.arange(len(flat_items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    user_tokens = np.array([f"u{u}" for u in range(num_users)], dtype=object)
    item_tokens = np.array([f"i{i}" for i in range(num_items)], dtype=object)
    kind_names = {f"u{u}": SYNTHETIC_KINDS[kinds[u]] for u in range(num_users)}
    return InteractionLog(
        users=user_tokens[user_index],
        items=item_tokens[flat_items],
        timestamps=(user_index * 1_000_000 + within).astype(np.float64),
        path="<synthetic>",
        format="synthetic",
        has_timestamps=True,
        meta={"user_kind": kind_names, "seed": seed},
    )
