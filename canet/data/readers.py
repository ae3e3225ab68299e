"""Reading interaction logs: :class:`InteractionLog`, the format readers and their detection.

Supported formats (:data:`FORMATS`); :func:`detect_format` tells them apart by the first
non-blank line of the file, never by its name:

* ``atomic`` (RecBole): a tab-separated typed header (``user_id:token``, ``item_id:token``,
  optionally ``timestamp:float``, any other ``name:type`` fields), then tab-separated rows.
* ``csv``: a header naming the user and item columns (``user_id``/``userID``/``user``,
  ``item_id``/``itemID``/``item``/``movieId``/``movie_id``/``movie``, optionally
  ``timestamp``; or the names in ``column_map``),
  delimited by ``,``, tab or ``;`` (quoted as the ``csv`` module reads it) or by whitespace.
* ``udata`` (MovieLens ``u.data``): ``user item rating timestamp``, whitespace-separated.
* ``ratings_dat`` (MovieLens ``ratings.dat``): ``user::item::rating::timestamp``.
* ``sasrec``: ``user item`` per line, in time order (no timestamps).

Without timestamps the row index stands in (file order). Every problem with a file raises
:class:`canet.errors.DataFormatError` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from canet.errors import ConfigError, DataFormatError

__all__ = ["FORMATS", "InteractionLog", "detect_format", "read_interactions"]

FORMATS = ("atomic", "sasrec", "udata", "ratings_dat", "csv")

# Lower-cased header names recognised without a column_map (covers userID/itemID too).
_USER_COLUMNS = ("user_id", "userid", "user")
# MovieLens ratings.csv (userId,movieId,rating,timestamp), the most common CSV, names movies.
_ITEM_COLUMNS = ("item_id", "itemid", "item", "movie_id", "movieid", "movie")
_TIME_COLUMNS = ("timestamp",)
_ATOMIC_FIELD = re.compile(r"^[^:\s]+:(token|float|token_seq|float_seq)$")
_CSV_DELIMITERS = (",", "\t", ";")
_SHOWN_CHARS = 60  # how much of an offending line/value goes into an error message


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
            f"header has no {role} column: expected one of {wanted}, got columns "
            f"{[name[:30] for name in names[:8]]}{' ...' if len(names) > 8 else ''}; name it "
            "with --column-map "
            f"'{{{role}: COLUMN}}' (config key column_map)",
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
