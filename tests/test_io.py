"""canet._io.write_text_atomic, the one atomic writer of every command: errors name the
user's path (never the hidden temporary), nothing is left behind, modes follow the umask."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from canet import _io, cli
from canet._io import write_text_atomic
from canet.data import synthetic_log

TINY_ARGS = ["--max-len", "8", "--depths=[1]", "--hidden=[8]", "--emb=[8]", "--heads", "2",
             "--router-dim", "8", "--router-heads", "2", "--epochs", "1", "--batch-size", "32",
             "--progress", "false", "--threads", "1", "--no-test"]


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_an_existing_directory_is_refused_by_its_own_name(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_text_atomic("x", tmp_path / "out")
    assert caught.value.filename == str(tmp_path / "out")
    assert _entries(tmp_path) == ["out"] and _entries(tmp_path / "out") == []


@pytest.mark.parametrize("stage", ["mkstemp", "fsync", "replace"])
def test_a_failed_write_names_the_users_path_and_leaves_nothing(tmp_path, monkeypatch,
                                                                  stage) -> None:
    path = tmp_path / "ranks.csv"
    write_text_atomic("old\n", path)

    def failing(*args, **kwargs):
        raise OSError(errno.EACCES if stage != "fsync" else errno.ENOSPC, "simulated",
                      str(tmp_path / ".ranks.csv.hidden.tmp"))

    target = {"mkstemp": tempfile, "fsync": os, "replace": os}[stage]
    monkeypatch.setattr(target, stage, failing)
    with pytest.raises(OSError) as caught:
        write_text_atomic("new\n", path)
    assert caught.value.filename == str(path) and caught.value.strerror == "simulated"
    monkeypatch.undo()
    assert path.read_text() == "old\n" and _entries(tmp_path) == ["ranks.csv"]


def test_a_parent_that_is_a_file_is_named(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file") as caught:
        write_text_atomic("x", tmp_path / "file" / "out.json")
    assert caught.value.filename == str(tmp_path / "file" / "out.json")


def test_modes_are_those_of_an_ordinary_write(tmp_path) -> None:
    before = os.umask(0o027)
    try:
        write_text_atomic("a", tmp_path / "new.json")
        (tmp_path / "kept.json").write_text("")
        os.chmod(tmp_path / "kept.json", 0o604)
        write_text_atomic("b", tmp_path / "kept.json")
    finally:
        os.umask(before)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "kept.json").stat().st_mode & 0o777 == 0o604


def test_recommend_output_errors_name_the_output(tmp_path, capsys, monkeypatch) -> None:
    """Issue 14 item 8: `recommend --output DIR` named the hidden temp file."""
    log = synthetic_log(30, 15, 0, seq_len=(5, 10))
    data = tmp_path / "log.csv"
    data.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{int(t)}\n" for u, i, t in zip(log.users, log.items, log.timestamps,
                                                strict=True)))
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "run"),
                     *TINY_ARGS]) == 0
    histories = tmp_path / "h.txt"
    histories.write_text(f"{log.users[0]} {log.items[0]}\n")
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    before = _entries(tmp_path)
    capsys.readouterr()
    command = ["recommend", str(tmp_path / "run"), "--input", str(histories), "--output"]
    assert cli.main([*command, str(out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"canet: error: {out_dir}: is a directory; expected a file path"]

    def denied(*args, **kwargs):  # an unwritable directory (root ignores chmod)
        raise PermissionError(errno.EACCES, "Permission denied", str(out_dir / ".r.csv.x.tmp"))

    monkeypatch.setattr(_io.tempfile, "mkstemp", denied)
    assert cli.main([*command, str(out_dir / "r.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"canet: error: {out_dir / 'r.csv'}: Permission denied"]
    assert _entries(tmp_path) == before and _entries(out_dir) == []
