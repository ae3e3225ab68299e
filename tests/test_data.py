"""Tests for canet.data: readers, format detection, errors, fuzzing, the split rule, windows,
vocab, synthetic logs, load_dataset."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canet.data
from canet.data import (
    FORMATS,
    MIN_EVAL_INTERACTIONS,
    InteractionLog,
    SequenceData,
    Vocab,
    build_dataset,
    detect_format,
    load_dataset,
    read_interactions,
    split_ends,
    synthetic_log,
)
from canet.data.split import NO_TARGET
from canet.errors import CanetError, ConfigError, DataFormatError

FIXTURES = Path(__file__).parent / "fixtures"
ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k.inter"

# The five fixture files hold the same interactions (user, item, timestamp) in each format.
TINY_ROWS = [
    ("1", "10", 300.0),
    ("1", "20", 100.0),
    ("2", "30", 50.0),
    ("1", "30", 200.0),
    ("2", "10", 60.0),
]
FIXTURE_FORMATS = {
    "tiny.inter": "atomic",
    "tiny.udata": "udata",
    "tiny.ratings.dat": "ratings_dat",
    "tiny.csv": "csv",
    "tiny_sasrec.txt": "sasrec",
}


def rows_of(log: InteractionLog) -> list[tuple[str, str, float]]:
    columns = (log.users.tolist(), log.items.tolist(), log.timestamps.tolist())
    return list(zip(*columns, strict=True))


def make_log(rows: list[tuple[str, str, float]], path: str = "<test>") -> InteractionLog:
    users, items, stamps = zip(*rows, strict=True)
    return InteractionLog(
        users=np.array(users, dtype=object),
        items=np.array(items, dtype=object),
        timestamps=np.array(stamps, dtype=np.float64),
        path=path,
        format="test",
    )


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "fmt"), sorted(FIXTURE_FORMATS.items()))
def test_each_reader_on_fixture(name: str, fmt: str) -> None:
    log = read_interactions(FIXTURES / name, format=fmt)
    assert log.format == fmt
    assert log.path == str(FIXTURES / name)
    if fmt == "sasrec":
        # No timestamps: file order (which is time order within a user) becomes the timestamp.
        assert not log.has_timestamps
        assert rows_of(log) == [
            ("1", "20", 0.0),
            ("1", "30", 1.0),
            ("1", "10", 2.0),
            ("2", "30", 3.0),
            ("2", "10", 4.0),
        ]
    else:
        assert log.has_timestamps
        assert rows_of(log) == TINY_ROWS
    assert log.timestamps.dtype == np.float64


@pytest.mark.parametrize(("name", "fmt"), sorted(FIXTURE_FORMATS.items()))
def test_all_formats_give_same_sequences(name: str, fmt: str) -> None:
    data = build_dataset(read_interactions(FIXTURES / name), max_len=5)
    tokens = {
        user: data.vocab.item_tokens(data.user_sequence(data.vocab.user_id(user)))
        for user in ("1", "2")
    }
    assert tokens == {"1": ["20", "30", "10"], "2": ["30", "10"]}


@pytest.mark.parametrize(
    ("misleading_name", "source"),
    [
        ("data.csv", "tiny.inter"),
        ("data.inter", "tiny.csv"),
        ("ratings.dat", "tiny.udata"),
        ("u.data", "tiny.ratings.dat"),
        ("interactions.csv", "tiny_sasrec.txt"),
    ],
)
def test_format_detected_from_content_not_name(
    tmp_path: Path, misleading_name: str, source: str
) -> None:
    target = tmp_path / misleading_name
    shutil.copy(FIXTURES / source, target)
    assert detect_format(target) == FIXTURE_FORMATS[source]
    assert read_interactions(target).format == FIXTURE_FORMATS[source]


@pytest.mark.parametrize(
    ("content", "column_map", "expected_rows", "has_time"),
    [
        (
            "userID\titemID\ttimestamp\nu1\ti1\t5\nu2\ti2\t3\n",
            None,
            [("u1", "i1", 5.0), ("u2", "i2", 3.0)],
            True,
        ),
        ("user_id;item_id\nu1;i1\nu2;i2\n", None, [("u1", "i1", 0.0), ("u2", "i2", 1.0)], False),
        (
            "uid;product;when\nu1;i1;7\n",
            {"user": "uid", "item": "product", "timestamp": "when"},
            [("u1", "i1", 7.0)],
            True,
        ),
        ('user_id,item_id,timestamp\n"u 1","i,2",5\n', None, [("u 1", "i,2", 5.0)], True),
        ("\ufeffuser_id,item_id,timestamp\r\nu1,i1,1.5\r\n\r\n", None, [("u1", "i1", 1.5)], True),
        ("USER_ID, ITEM_ID, TIMESTAMP\nu1, i1, 2\n", None, [("u1", "i1", 2.0)], True),
    ],
)
def test_csv_variants(
    tmp_path: Path, content: str, column_map: dict | None, expected_rows: list, has_time: bool
) -> None:
    path = write(tmp_path, "x.txt", content)
    log = read_interactions(path, column_map=column_map)
    assert log.format == "csv"
    assert rows_of(log) == expected_rows
    assert log.has_timestamps is has_time


def test_movielens_ratings_csv_is_recognised(tmp_path: Path) -> None:
    # MovieLens ratings.csv, the most common CSV: its item column is movieId.
    path = write(tmp_path, "ratings.csv",
                 "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n")
    log = read_interactions(path)
    assert log.format == "csv" and log.has_timestamps
    assert rows_of(log) == [("1", "31", 1260759144.0), ("1", "1029", 1260759179.0)]


def test_a_header_without_user_or_item_column_mentions_column_map(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", "uid,iid,ts\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"no user column: .*--column-map '\{user: COLUMN\}'"):
        read_interactions(path, format="csv")
    path = write(tmp_path, "y.csv", "user_id,product,ts\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"no item column: .*--column-map '\{item: COLUMN\}'"):
        read_interactions(path)


def test_atomic_without_timestamp_and_with_column_map(tmp_path: Path) -> None:
    path = write(
        tmp_path, "a.inter", "session_id:token\titem_id:token\tprice:float\ns1\ti1\t2.0\ns1\ti2\t\n"
    )
    log = read_interactions(path, column_map={"user": "session_id"})
    assert log.format == "atomic"
    assert not log.has_timestamps
    assert rows_of(log) == [("s1", "i1", 0.0), ("s1", "i2", 1.0)]


def test_reader_speed_on_many_lines(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 1000, 200_000), rng.integers(0, 5000, 200_000)
    lines = [f"{u}\t{i}\t3\t{t}" for t, (u, i) in enumerate(zip(users, items, strict=True))]
    path = write(tmp_path, "big", "\n".join(lines) + "\n")
    started = time.perf_counter()
    log = read_interactions(path)
    elapsed = time.perf_counter() - started
    assert len(log) == 200_000
    assert elapsed < 5.0, f"reading 200k lines took {elapsed:.2f}s"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

BAD_FILES = [
    # (content, format, expected line, fragment of the message)
    ("", None, None, "empty"),
    ("\n  \n\t\n", None, None, "empty"),
    ("a,b,c\n1,2,3\n", None, 1, "cannot detect the format"),
    ("1 2 3\n", None, 1, "cannot detect the format"),
    ("user_id:token\titem_id:token\n", None, None, "no interaction rows"),
    ("user_id:token\titem_id:token\tts:float\nu\ti\t1\nu\ti\n", None, 3, "expected 3"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\tabc\n", None, 2, "'abc' is not a"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\tnan\n", None, 2, "finite"),
    ("item_id:token\ttimestamp:float\ni\t1\n", "atomic", 1, "no user column"),
    ("user_id:token\titem_id\nu\ti\n", "atomic", 1, "atomic header field"),
    ("user_id:token\titem_id:token\n\tx\n", None, 2, "empty user token"),
    ("user_id,foo\nu,1\n", None, 1, "no item column"),
    ("user_id,item_id,timestamp\nu,i,1\nu,i\n", None, 3, "expected 3"),
    ("user_id,item_id,timestamp\nu,i,1\nu,i,yesterday\n", None, 3, "'yesterday' is not"),
    ("user_id,item_id\nu,\n", None, 2, "empty item token"),
    ("uid,iid\nu,i\n", "csv", 1, "no user column"),
    ("1\t2\t3\t4\n1\t2\t3\n", None, 2, "expected 4 fields"),
    ("1\t2\t3\t4\n1\t2\t3\tlater\n", None, 2, "'later' is not a number"),
    ("1::2::3::4\n1::2::3\n", None, 2, "expected 4 '::'"),
    ("1::2::3::4\n\n1::2::3::x\n", None, 3, "'x' is not a number"),
    ("1 2\n2 3\n\n4 5 6\n", None, 4, "expected 2 fields"),
    (b"1 2\n\xff\xfe 3\n", None, 2, "not UTF-8"),
    (b"\xff\xfe\x00\x01", None, 1, "not UTF-8"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\n", "udata", 1, "expected 4"),
    ("u i\n", "ratings_dat", 1, "expected 4 '::'"),
]


@pytest.mark.parametrize(("content", "fmt", "line", "fragment"), BAD_FILES)
def test_bad_files_raise_data_format_error_with_location(
    tmp_path: Path, content: str | bytes, fmt: str | None, line: int | None, fragment: str
) -> None:
    path = write(tmp_path, "bad.txt", content)
    with pytest.raises(DataFormatError) as caught:
        read_interactions(path, format=fmt)
    error = caught.value
    assert error.path == str(path)
    assert error.line == line
    assert fragment in error.message
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(error).startswith(prefix)
    assert "\n" not in str(error)
    assert isinstance(error, CanetError) and isinstance(error, ValueError)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="not found") as caught:
        read_interactions(tmp_path / "nope.inter")
    assert caught.value.line is None
    assert str(caught.value) == f"{tmp_path / 'nope.inter'}: file not found"
    with pytest.raises(DataFormatError, match="directory"):
        read_interactions(tmp_path)


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    path = FIXTURES / "tiny.csv"
    with pytest.raises(ConfigError, match="unknown format"):
        read_interactions(path, format="parquet")
    with pytest.raises(ConfigError, match="column_map keys"):
        read_interactions(path, column_map={"usr": "user_id"})
    with pytest.raises(ConfigError, match="column_map applies"):
        read_interactions(FIXTURES / "tiny.udata", column_map={"user": "x"})


def test_data_format_error_str() -> None:
    assert str(DataFormatError("f.csv", 3, "bad\nthing")) == "f.csv:3: bad thing"
    assert str(DataFormatError(Path("f.csv"), None, "gone")) == "f.csv: gone"


# --------------------------------------------------------------------------------------------
# Fuzzing: only InteractionLog or DataFormatError, never another exception, never a hang
# --------------------------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)


def check_reads_cleanly(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "fuzz.csv")
        with open(path, "wb") as handle:
            handle.write(content)
        for fmt in (None, *FORMATS):
            try:
                log = read_interactions(path, format=fmt)
            except DataFormatError as error:
                assert error.path == path
                assert "\n" not in str(error)
                continue
            assert len(log) > 0
            assert len(log.items) == len(log.timestamps) == len(log)
            assert np.isfinite(log.timestamps).all()
            assert all(isinstance(t, str) and t for t in log.users.tolist())
            try:
                data = build_dataset(log, max_len=4)
            except DataFormatError:
                continue
            assert int(data.lengths.sum()) == len(log)


@FUZZ_SETTINGS
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(content: bytes) -> None:
    check_reads_cleanly(content)


FIXTURE_BYTES = [(FIXTURES / name).read_bytes() for name in sorted(FIXTURE_FORMATS)]
INTERESTING = [
    b"\t",
    b",",
    b";",
    b"::",
    b" ",
    b"\n",
    b"\r",
    b'"',
    b"\x00",
    b"\xff",
    b":token",
    b"nan",
    b"inf",
    b"1e999",
    b"-",
    b"user_id",
    b"\xef\xbb\xbf",
]


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    content = bytearray(draw(st.sampled_from(FIXTURE_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(content)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "duplicate_line"]))
        if action == "insert":
            piece = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(max_size=4)))
            content[position:position] = piece
        elif action == "delete":
            content[position : position + draw(st.integers(1, 8))] = b""
        elif action == "replace" and position < len(content):
            content[position] = draw(st.integers(0, 255))
        else:
            lines = bytes(content).split(b"\n")
            chosen = draw(st.integers(0, len(lines) - 1))
            lines.insert(chosen, lines[chosen])
            content = bytearray(b"\n".join(lines))
    return bytes(content)


@FUZZ_SETTINGS
@given(mutated_fixture())
def test_fuzz_mutated_valid_files(content: bytes) -> None:
    check_reads_cleanly(content)


# --------------------------------------------------------------------------------------------
# Splits, filters, ids
# --------------------------------------------------------------------------------------------

SPLIT_ROWS = [
    ("alice", "a", 5),
    ("alice", "b", 1),
    ("bob", "a", 1),
    ("alice", "c", 3),
    ("dave", "d", 2),
    ("alice", "d", 3),
    ("carol", "c", 7),
    ("dave", "c", 2),
    ("bob", "b", 2),
    ("alice", "e", 9),
    ("dave", "e", 2),
]
# ids by sorted token: users alice=0 bob=1 carol=2 dave=3; items a=1 b=2 c=3 d=4 e=5


def test_split_hand_made() -> None:
    data = build_dataset(make_log(SPLIT_ROWS), max_len=3)
    assert data.vocab.user_tokens == ["alice", "bob", "carol", "dave"]
    assert data.vocab.item_tokens([1, 2, 3, 4, 5]) == ["a", "b", "c", "d", "e"]
    assert (data.num_users, data.num_items) == (4, 5)
    # alice: b(1) c(3) d(3) a(5) e(9) -- c before d: same timestamp, file order kept.
    # dave: all at time 2 -> file order d, c, e.
    assert data.user_sequence(0).tolist() == [2, 3, 4, 1, 5]
    assert data.user_sequence(1).tolist() == [1, 2]
    assert data.user_sequence(2).tolist() == [3]
    assert data.user_sequence(3).tolist() == [4, 3, 5]
    assert data.offsets.tolist() == [0, 5, 7, 8, 11]
    assert data.stats["num_train_only_users"] == 2
    assert data.stats["num_eval_users"] == 2
    assert data.stats["num_interactions"] == 11

    valid = [tuple(t.tolist() for t in batch) for batch in data.eval_batches("valid", 10)]
    assert valid == [([0, 3], [[2, 3, 4], [0, 0, 4]], [1, 3])]
    test = [tuple(t.tolist() for t in batch) for batch in data.eval_batches("test", 10)]
    assert test == [([0, 3], [[3, 4, 1], [0, 4, 3]], [5, 5])]

    assert data.history("valid", 0).tolist() == [2, 3, 4]
    assert data.history("test", 0).tolist() == [2, 3, 4, 1]
    assert data.history("test", 1).tolist() == [1, 2]  # train-only user: everything is history
    rows, cols = data.history_pairs("test", torch.tensor([3, 0]))
    assert rows.tolist() == [0, 0, 1, 1, 1, 1]
    assert cols.tolist() == [4, 3, 2, 3, 4, 1]

    batches = list(data.train_batches(10, shuffle=False))
    assert len(batches) == 1
    seqs, targets = batches[0]
    # alice's prefix b c d -> input [_, b, c], target [_, c, d]; bob's a b -> [_, _, a] -> b.
    assert seqs.tolist() == [[0, 2, 3], [0, 0, 1]]
    assert targets.tolist() == [[0, 3, 4], [0, 0, 2]]
    assert seqs.dtype == targets.dtype == torch.int64


def test_ids_do_not_depend_on_row_order() -> None:
    forward = build_dataset(make_log(SPLIT_ROWS), max_len=3)
    backward_rows = list(reversed(SPLIT_ROWS))
    backward = build_dataset(make_log(backward_rows), max_len=3)
    assert forward.vocab == backward.vocab
    # Only tie order (file order) may differ: alice's c/d and all of dave's items.
    assert backward.user_sequence(0).tolist() == [2, 4, 3, 1, 5]
    assert backward.user_sequence(3).tolist() == [5, 3, 4]


def test_filters_are_repeated_until_stable() -> None:
    sequences = {"u1": "ABC", "u2": "ABD", "u3": "AX", "u4": "ABCE", "u5": "ABE"}
    rows = [
        (user, item, float(t)) for user, items in sequences.items() for t, item in enumerate(items)
    ]
    data = build_dataset(make_log(rows), max_len=4, min_user_inter=3, min_item_inter=2)
    # Pass 1 drops u3 (2 items) and D, X (1 user each); that leaves u2 with only A, B, so a
    # second pass must drop u2 too. A single pass would keep u2.
    assert data.vocab.user_tokens == ["u1", "u4", "u5"]
    assert data.vocab.item_tokens(range(1, 5)) == ["A", "B", "C", "E"]
    assert data.stats["num_filtered_interactions"] == 5
    assert data.stats["num_interactions"] == 10


def test_no_user_with_three_interactions_raises() -> None:
    log = make_log([("u", "a", 1), ("u", "b", 2), ("v", "a", 1)], path="tiny.inter")
    with pytest.raises(DataFormatError, match="at least 3 interactions") as caught:
        build_dataset(log, max_len=5)
    assert caught.value.path == "tiny.inter" and caught.value.line is None
    with pytest.raises(DataFormatError):
        build_dataset(make_log(SPLIT_ROWS), max_len=5, min_item_inter=100)


def test_no_training_window_raises() -> None:
    # Every user has exactly 3 interactions: one training item each, so no (input, target)
    # window; training would take no step.
    rows = [(u, i, float(t)) for u in "12" for t, i in enumerate("123")]
    with pytest.raises(DataFormatError, match="no training windows: every user has fewer than 4"
                       ) as caught:
        build_dataset(make_log(rows, path="three.txt"), max_len=5)
    assert caught.value.path == "three.txt" and caught.value.line is None
    # One user with 4 interactions is enough (and a train-only user with 2 also gives one).
    assert build_dataset(make_log([*rows, ("1", "4", 9.0)]), max_len=5).stats[
        "num_train_samples"] == 1
    assert build_dataset(make_log([*rows, ("3", "1", 0.0), ("3", "2", 1.0)]), max_len=5).stats[
        "num_train_samples"] == 1


@pytest.mark.parametrize(
    "kwargs", [{"max_len": 0}, {"max_len": 2.5}, {"max_len": 3, "min_user_inter": -1}]
)
def test_build_dataset_validates_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        build_dataset(make_log(SPLIT_ROWS), **kwargs)


# --------------------------------------------------------------------------------------------
# The leave-one-out rule (canet.data.split) and its users
# --------------------------------------------------------------------------------------------


def test_split_ends_rule() -> None:
    assert MIN_EVAL_INTERACTIONS == 3
    ends = split_ends(np.array([0, 1, 2, 3, 4, 10]))
    # Fewer than 3 items: all training, no targets; else test = n-1, valid = n-2, train = n-2.
    assert ends.train.tolist() == [0, 1, 2, 1, 2, 8]
    assert ends.valid.tolist() == [NO_TARGET] * 3 + [1, 2, 8]
    assert ends.test.tolist() == [NO_TARGET] * 3 + [2, 3, 9]
    assert ends.has_eval.tolist() == [False, False, False, True, True, True]
    assert ends.history_end("train").tolist() == [0, 1, 2, 1, 2, 8]
    assert ends.history_end("valid").tolist() == [0, 1, 2, 1, 2, 8]
    assert ends.history_end("test").tolist() == [0, 1, 2, 2, 3, 9]
    assert all(array.dtype == np.int64 for array in ends)
    assert split_ends(np.zeros(0, dtype=np.int64)).train.tolist() == []


@pytest.mark.parametrize(
    ("lengths", "fragment"),
    [
        (np.array([[3, 4]]), "1-D integer array"),
        (np.array([3.0, 4.0]), "1-D integer array"),
        (np.array([3, -1]), "lengths must be >= 0, got minimum -1"),
    ],
)
def test_split_ends_rejects_bad_lengths(lengths: np.ndarray, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        split_ends(lengths)
    with pytest.raises(ValueError, match="split must be 'train', 'valid' or 'test'"):
        split_ends(np.array([3])).history_end("all")


def test_sequence_data_targets_follow_split_ends() -> None:
    # Users of 1..10 interactions (user "u{n}" has n items), each item token unique per user.
    rows = [(f"u{n:02d}", f"u{n:02d}i{t}", float(t)) for n in range(1, 11) for t in range(n)]
    data = build_dataset(make_log(rows), max_len=4)
    ends = split_ends(data.lengths)
    assert data.lengths.tolist() == list(range(1, 11))
    assert data.train_lengths.tolist() == ends.train.tolist()
    for split in ("valid", "test"):
        target_at = ends.valid if split == "valid" else ends.test
        expected_users = np.flatnonzero(target_at != NO_TARGET).tolist()
        assert data.eval_users(split).tolist() == expected_users
        _, _, targets = zip(*data.eval_batches(split, 3), strict=True)
        expected = [data.user_sequence(u)[target_at[u]] for u in expected_users]
        assert torch.cat(targets).tolist() == expected
        for user in range(data.num_users):
            history = data.history(split, user).tolist()
            assert history == data.user_sequence(user)[: ends.history_end(split)[user]].tolist()
    # Training targets are exactly the prefix items after the first: seq[1:train].
    covered = collect_pairs(data, batch_size=5)
    expected_pairs = Counter(
        (int(seq[t - 1]), int(seq[t]))
        for user in range(data.num_users)
        for seq in [data.user_sequence(user)]
        for t in range(1, int(ends.train[user]))
    )
    assert covered == expected_pairs


def test_load_dataset_is_read_then_build(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "uid,iid,ts\n" + "".join(
        f"{user},{item},{t}\n" for t, (user, item, _) in enumerate(SPLIT_ROWS)
    ))
    column_map = {"user": "uid", "item": "iid", "timestamp": "ts"}
    data = load_dataset(path, max_len=3, format="csv", column_map=column_map, min_user_inter=2)
    log = read_interactions(path, format="csv", column_map=column_map)
    built = build_dataset(log, 3, min_user_inter=2)
    assert data.vocab == built.vocab and data.max_len == 3
    assert data.items.tolist() == built.items.tolist()
    assert data.offsets.tolist() == built.offsets.tolist()
    assert data.stats == built.stats and data.path == str(path)
    assert load_dataset(FIXTURES / "tiny.udata", max_len=2).vocab.user_tokens == ["1", "2"]
    with pytest.raises(TypeError):
        load_dataset(path, 3)  # type: ignore[misc]  # the options are keyword-only
    with pytest.raises(ConfigError, match="max_len must be an int >= 1"):
        load_dataset(path, max_len=0, column_map=column_map)
    with pytest.raises(DataFormatError, match="file not found"):
        load_dataset(tmp_path / "missing.inter", max_len=3)


def test_old_import_paths_still_work() -> None:
    from canet.data import dataset, readers, synthetic, vocab

    assert canet.data.read_interactions is readers.read_interactions
    assert canet.data.InteractionLog is readers.InteractionLog
    assert canet.data.FORMATS is readers.FORMATS
    assert canet.data.Vocab is vocab.Vocab
    assert canet.data.SequenceData is dataset.SequenceData
    assert canet.data.build_dataset is dataset.build_dataset
    assert canet.data.SYNTHETIC_KINDS is synthetic.SYNTHETIC_KINDS
    assert set(canet.data.__all__) >= {
        "FORMATS", "InteractionLog", "SequenceData", "Vocab", "build_dataset", "detect_format",
        "read_interactions", "synthetic_log",
    }


# --------------------------------------------------------------------------------------------
# Training windows
# --------------------------------------------------------------------------------------------


def collect_pairs(data: SequenceData, batch_size: int) -> Counter:
    """Counter of (user-independent) (input item, target item) pairs over all batches."""
    pairs: Counter = Counter()
    for seqs, targets in data.train_batches(batch_size, torch.Generator().manual_seed(1)):
        assert seqs.shape == targets.shape == (seqs.shape[0], data.max_len)
        assert torch.equal(seqs == 0, targets == 0)  # padding in the same places
        for seq_row, target_row in zip(seqs.tolist(), targets.tolist(), strict=True):
            used = [j for j, item in enumerate(seq_row) if item]
            # Left padding: real items are a contiguous block ending at position L-1.
            assert used == list(range(data.max_len - len(used), data.max_len))
            # Each target is the next input: the window is one contiguous stretch of history.
            assert all(target_row[j] == seq_row[j + 1] for j in used[:-1])
            pairs.update((seq_row[j], target_row[j]) for j in used)
    return pairs


def test_sliding_windows_long_history() -> None:
    # One user with 13 distinct items: prefix = 11 items (ids 1..11), 10 targets (2..11);
    # max_len 3 -> windows of 3, 3, 3 and 1 targets, the oldest one left-padded.
    rows = [("u", f"i{t:02d}", float(t)) for t in range(13)] + [
        ("v", "i00", 0.0),
        ("v", "i01", 1.0),
        ("v", "i02", 2.0),
    ]
    data = build_dataset(make_log(rows), max_len=3)
    assert data.stats["num_train_samples"] == 4  # v's prefix has one item -> no sample
    seqs, targets = list(data.train_batches(10, shuffle=False))[0]
    assert seqs.tolist() == [[8, 9, 10], [5, 6, 7], [2, 3, 4], [0, 0, 1]]
    assert targets.tolist() == [[9, 10, 11], [6, 7, 8], [3, 4, 5], [0, 0, 2]]
    assert collect_pairs(data, 3) == Counter({(t, t + 1): 1 for t in range(1, 11)})


@settings(max_examples=60, deadline=2000)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    max_len=st.integers(1, 7),
    batch_size=st.integers(1, 9),
)
def test_every_training_target_covered_exactly_once(
    lengths: list[int], max_len: int, batch_size: int
) -> None:
    # Distinct items everywhere, so a pair identifies its position; one extra user with 4
    # interactions ensures an evaluated user and a training window exist.
    rows = []
    counter = 0
    for user, length in enumerate([*lengths, 4]):
        for t in range(length):
            rows.append((f"u{user:02d}", f"i{counter:05d}", float(t)))
            counter += 1
    data = build_dataset(make_log(rows), max_len=max_len)
    expected: Counter = Counter()
    first_id = 1
    for length in [*lengths, 4]:
        prefix = length - 2 if length >= 3 else length
        expected.update((first_id + t, first_id + t + 1) for t in range(prefix - 1))
        first_id += length
    assert collect_pairs(data, batch_size) == expected
    assert data.num_train_batches(batch_size) == -(-data.stats["num_train_samples"] // batch_size)


def test_train_batches_shuffle_is_seeded_and_drop_last() -> None:
    data = build_dataset(synthetic_log(40, 30, seed=3, seq_len=(5, 12)), max_len=4)
    first = [s for s, _ in data.train_batches(8, torch.Generator().manual_seed(7))]
    again = [s for s, _ in data.train_batches(8, torch.Generator().manual_seed(7))]
    other = [s for s, _ in data.train_batches(8, torch.Generator().manual_seed(8))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    count = data.stats["num_train_samples"]
    dropped = list(data.train_batches(8, shuffle=False, drop_last=True))
    assert len(dropped) == count // 8 and all(s.shape[0] == 8 for s, _ in dropped)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.train_batches(0))


def test_eval_batches_independent_of_batch_size() -> None:
    data = build_dataset(synthetic_log(30, 25, seed=5), max_len=6)

    def joined(batch_size: int) -> list[torch.Tensor]:
        batches = list(data.eval_batches("test", batch_size))
        return [torch.cat(parts) for parts in zip(*batches, strict=True)]

    reference = joined(1000)
    for batch_size in (1, 7):
        assert all(torch.equal(a, b) for a, b in zip(reference, joined(batch_size), strict=True))
    users, seqs, targets = reference
    assert users.tolist() == list(range(30))
    for user, seq, target in zip(users.tolist(), seqs.tolist(), targets.tolist(), strict=True):
        full = data.user_sequence(user).tolist()
        assert target == full[-1]
        assert seq == ([0] * 6 + full[:-1])[-6:]
    with pytest.raises(ValueError, match="split"):
        next(data.eval_batches("train", 4))


# --------------------------------------------------------------------------------------------
# Vocab
# --------------------------------------------------------------------------------------------


def test_vocab_round_trip_and_unknowns() -> None:
    vocab = Vocab(["u1", "u2"], ["apple", "pear", "ünïcode item"])
    restored = Vocab.from_json(vocab.to_json())
    assert restored == vocab
    assert Vocab.from_dict(vocab.to_dict()) == vocab
    ids, unknown = restored.item_ids(["pear", "kiwi", "ünïcode item", "kiwi", "apple"])
    assert ids.tolist() == [2, 3, 1]
    assert unknown == ["kiwi", "kiwi"]
    assert restored.item_tokens(np.array([3, 1])) == ["ünïcode item", "apple"]
    assert restored.item_tokens(torch.tensor([2])) == ["pear"]
    assert restored.user_id("u2") == 1 and restored.user_id("nobody") is None
    with pytest.raises(ValueError, match=r"1\.\.3"):
        restored.item_tokens([0])
    with pytest.raises(ValueError, match=r"1\.\.3"):
        restored.item_tokens([4])


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2, "users": [], "items": []}',
        '{"version": 1, "users": [1], "items": []}',
        '{"version": 1, "users": ["a", "a"], "items": []}',
    ],
)
def test_vocab_from_bad_json(text: str) -> None:
    with pytest.raises(DataFormatError) as caught:
        Vocab.from_json(text, source="ckpt/vocab.json")
    assert str(caught.value).startswith("ckpt/vocab.json: ")


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def test_synthetic_log_is_seeded_and_has_all_kinds() -> None:
    first = synthetic_log(60, 50, seed=11)
    second = synthetic_log(60, 50, seed=11)
    other = synthetic_log(60, 50, seed=12)
    assert rows_of(first) == rows_of(second)
    assert rows_of(first) != rows_of(other)
    kinds = first.meta["user_kind"]
    assert set(kinds.values()) == {"cycle", "markov", "second_order"}
    assert set(kinds) == set(first.users.tolist())
    data = build_dataset(first, max_len=10)
    assert data.num_users == 60 and data.num_items <= 50


def test_synthetic_behaviours_follow_their_rules_without_noise() -> None:
    log = synthetic_log(90, 40, seed=2, noise=0.0, seq_len=(12, 20))
    sequences: dict[str, list[str]] = {}
    for user, item in zip(log.users.tolist(), log.items.tolist(), strict=True):
        sequences.setdefault(user, []).append(item)
    second_order_rule: dict[tuple[str, str], str] = {}
    for user, kind in log.meta["user_kind"].items():
        seq = sequences[user]
        if kind == "cycle":
            period = next(
                p for p in (2, 3, 4) if all(seq[t] == seq[t - p] for t in range(p, len(seq)))
            )
            assert len(set(seq)) == period
        elif kind == "second_order":
            for t in range(2, len(seq)):
                # The next item is a function of the previous two, shared by all such users.
                assert second_order_rule.setdefault((seq[t - 2], seq[t - 1]), seq[t]) == seq[t]
    assert second_order_rule


# --------------------------------------------------------------------------------------------
# Real data (optional)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ML100K.exists(), reason=f"MovieLens-100k not found at {ML100K}")
def test_ml100k() -> None:
    started = time.perf_counter()
    log = read_interactions(ML100K)
    read_seconds = time.perf_counter() - started
    assert log.format == "atomic"
    assert len(log) == 100_000
    # First row of the MovieLens-100k u.data file.
    assert rows_of(log)[0] == ("196", "242", 881250949.0)
    data = build_dataset(log, max_len=50)
    assert (data.num_users, data.num_items, data.stats["num_interactions"]) == (943, 1682, 100_000)
    # Every ML-100k user has >= 20 ratings, so all are evaluated.
    assert data.stats["num_eval_users"] == 943
    assert read_seconds < 10.0

    # Independent per-user ordering: pure-Python stable sort by timestamp.
    per_user: dict[str, list[tuple[float, int, str]]] = {}
    for index, (user, item, stamp) in enumerate(rows_of(log)):
        per_user.setdefault(user, []).append((stamp, index, item))
    for user in ("196", "1", "943"):
        expected = [item for _, _, item in sorted(per_user[user])]
        assert data.vocab.item_tokens(data.user_sequence(data.vocab.user_id(user))) == expected
    seqs, targets = next(data.train_batches(64, torch.Generator().manual_seed(0)))
    assert seqs.shape == (64, 50) and int(targets.max()) <= 1682
