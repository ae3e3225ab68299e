"""Checkpoint directories: atomic saves, validated loads.

Layout of one checkpoint directory (``RUN_DIR/best/``, ``RUN_DIR/last/``)::

    model.safetensors     exactly model.state_dict() (the canonical schema); metadata:
                          canet_version, arch (JSON of model.arch), tensors_sha256
    config.yaml           the resolved TrainConfig
    vocab.json            Vocab.to_json(): external token <-> internal id
    trainer_state.json    epoch, best score, counters, python/numpy RNG state, file digests,
                          ``data``: the identity of the training split (see :func:`data_identity`)
    optimizer.pt          optimizer, scheduler, torch RNG states (torch.load(weights_only=True))
    calibration.json      optional: the serve-time budget table (canet.budget.BudgetTable.to_json),
                          written at the end of training and by ``canet calibrate``
                          (:func:`write_calibration`); listed in the digests like the others

Saving writes a temporary sibling directory, fsyncs every file and the directory, then swaps it
in with renames: ``target -> .target.old-*``, ``tmp -> target``, then deletes the old one. A
process killed at any point leaves either the previous or the new checkpoint complete; a kill
between the two renames leaves the previous one as ``.target.old-*``, which :func:`load_*`
reads in place and :func:`cleanup_leftovers` (run by the next training start) renames back.

One writer per run directory: :func:`lock_run_dir` (taken by :func:`canet.train.train` for the
whole run) holds ``fcntl.flock`` on ``RUN_DIR/.lock``. Readers take no lock; :func:`load_checkpoint`
instead retries when the directory it reads is swapped under it (see there).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from ._io import fsync_dir as _fsync_dir
from ._io import fsync_file as _fsync_file
from ._io import process_umask, set_created_mode, write_text_atomic
from ._version import __version__
from .budget import BudgetError, BudgetTable, flops_fractions
from .config import TrainConfig, config_from_dict, dump_config
from .data import SequenceData, Vocab
from .errors import CanetError, CheckpointError
from .model import CANet
from .space import RoutingSpace

__all__ = [
    "write_text_atomic",
    "MODEL_FILE",
    "CONFIG_FILE",
    "VOCAB_FILE",
    "STATE_FILE",
    "OPTIMIZER_FILE",
    "CALIBRATION_FILE",
    "Checkpoint",
    "save_checkpoint",
    "write_calibration",
    "load_checkpoint",
    "load_model_weights",
    "load_training_state",
    "resolve_checkpoint_dir",
    "cleanup_leftovers",
    "lock_run_dir",
    "lock_checkpoint",
    "LOCK_FILE",
    "capture_rng_state",
    "data_identity",
    "describe_data_change",
    "restore_rng_state",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
VOCAB_FILE = "vocab.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CALIBRATION_FILE = "calibration.json"  # optional
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, STATE_FILE, OPTIMIZER_FILE)
LOCK_FILE = ".lock"
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


@dataclass
class Checkpoint:
    """A loaded checkpoint directory (weights already inside ``model``; ``calibration``, the
    budget table of calibration.json or None, also in ``model.budget_table``)."""

    path: Path
    model: CANet
    config: TrainConfig
    vocab: Vocab
    trainer_state: dict[str, Any]
    calibration: BudgetTable | None = None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order: catches corrupted
    tensor data, which the safetensors header alone cannot."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def save_checkpoint(
    target: str | os.PathLike[str],
    model: CANet,
    config: TrainConfig,
    vocab: Vocab,
    trainer_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    calibration: BudgetTable | None = None,
) -> Path:
    """Write a complete checkpoint to ``target`` atomically (see the module docstring).

    ``trainer_state`` must be JSON-serialisable; ``optimizer_state`` is a dict of tensors and
    plain containers (optimizer/scheduler state dicts, torch RNG states); ``calibration``, when
    given, is written as calibration.json (it must be this model's: see
    :func:`write_calibration`). Refuses (CheckpointError) a model with NaN/inf weights, so a
    diverged run never replaces a good checkpoint.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    bad = [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"{target}: refusing to save a model with NaN/inf weights in {bad[:5]}"
        )
    if calibration is not None:
        _check_table_fits(calibration, model.arch, target / CALIBRATION_FILE)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_MARK}", dir=parent))
    try:
        metadata = {
            "canet_version": __version__,
            "arch": json.dumps(model.arch, sort_keys=True),
            "tensors_sha256": _tensors_digest(state),
        }
        save_file(state, str(tmp / MODEL_FILE), metadata=metadata)
        _write_text(tmp / CONFIG_FILE, dump_config(config))
        _write_text(tmp / VOCAB_FILE, vocab.to_json())
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        files = [MODEL_FILE, CONFIG_FILE, VOCAB_FILE, OPTIMIZER_FILE]
        if calibration is not None:
            _write_text(tmp / CALIBRATION_FILE, calibration.to_json())
            files.append(CALIBRATION_FILE)
        digests = {name: _file_digest(tmp / name) for name in files}
        full_state = {
            **trainer_state,
            "canet_version": __version__,
            "arch": model.arch,
            "files_sha256": digests,
        }
        _finish_and_swap(tmp, target, full_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _finish_and_swap(tmp: Path, target: Path, state: dict[str, Any]) -> None:
    """Write trainer_state.json into the temporary checkpoint ``tmp`` (whose other files are
    complete), give every file the umask's modes, fsync everything, and swap it in."""
    # Written last: a directory with a valid trainer_state.json had every other file done.
    _write_text(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
    # mkdtemp makes the directory 0700 and libraries pick their own file modes: give
    # everything the umask's usual modes, or other accounts could not load the run.
    umask = process_umask()
    set_created_mode(tmp, directory=True, umask=umask)
    for path in sorted(tmp.iterdir()):
        set_created_mode(path, umask=umask)
        _fsync_file(path)
    _fsync_dir(tmp)
    _swap_in(tmp, target)


def write_calibration(
    checkpoint_dir: str | os.PathLike[str],
    table: BudgetTable,
    *,
    model_sha256: str | None = None,
) -> Path:
    """Add (or replace) calibration.json in a checkpoint directory (a run directory: its
    ``best/``, as :func:`load_checkpoint` resolves it), atomically.

    A complete sibling copy of the checkpoint (its other files copied, the new
    calibration.json, trainer_state.json with the new digest) is written, fsynced and swapped
    in like a save, so a reader sees the old or the new checkpoint, never a mix. The run
    directory's writer lock (:func:`lock_run_dir`) is held meanwhile when ``checkpoint_dir``
    is a run's ``best/`` or ``last/``: refused (CheckpointError) while a `canet train` writes
    there (re-entrant: training itself calibrates under its own lock).

    Refused too: a table that is not this model's (its smallest achievable budget differs from
    the model's), a checkpoint whose files do not match their digests (it must not be blessed
    with a new state), and, with ``model_sha256`` (the digest of the model file the table was
    calibrated on), a checkpoint whose model changed since (a training run saved it meanwhile).
    Returns the checkpoint directory written.
    """
    directory = resolve_checkpoint_dir(checkpoint_dir)
    if directory.name.startswith("."):
        raise CheckpointError(
            f"{directory}: the leftover of an interrupted save, not a checkpoint to write into "
            "(the next `canet train` in the run directory restores it)"
        )
    with lock_checkpoint(directory):
        state = _read_state_json(directory)
        recorded = state.get("files_sha256")
        if not isinstance(recorded, dict):
            raise CheckpointError(
                f"{directory / STATE_FILE}: no file digests; cannot add a calibration table"
            )
        if model_sha256 is not None and recorded.get(MODEL_FILE) != model_sha256:
            raise CheckpointError(
                f"{directory}: its model changed since it was calibrated (a training run saved "
                "it meanwhile); calibrate again"
            )
        _check_table_fits(table, state["arch"], directory / CALIBRATION_FILE)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}{_TMP_MARK}",
                                    dir=directory.parent))
        try:
            for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, OPTIMIZER_FILE):
                shutil.copyfile(_require(directory, name), tmp / name)
                _check_digest(tmp, name, state)  # the copy: a corrupted file stays refused
            _write_text(tmp / CALIBRATION_FILE, table.to_json())
            digests = {**recorded, CALIBRATION_FILE: _file_digest(tmp / CALIBRATION_FILE)}
            _finish_and_swap(tmp, directory, {**state, "files_sha256": digests})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory


def lock_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> contextlib.AbstractContextManager:
    """The writer lock that guards ``checkpoint_dir``: its run directory's
    (:func:`lock_run_dir`) when it is a run's ``best/`` or ``last/``, else none (nothing trains
    into a checkpoint directory of its own)."""
    directory = Path(checkpoint_dir)
    if directory.name in ("best", "last"):
        return lock_run_dir(directory.parent)
    return contextlib.nullcontext(directory)


def _check_table_fits(table: BudgetTable, arch: dict[str, Any], path: Path) -> None:
    """CheckpointError unless ``table`` was calibrated for a model of ``arch``: its smallest
    achievable budget is that model's cheapest config's FLOPs fraction (to 1e-12)."""
    try:
        space = RoutingSpace.from_dict(arch["space"])
        fractions = flops_fractions(space, int(arch["max_len"]), int(arch["num_items"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the checkpoint's architecture is invalid ({error})"
        ) from None
    if abs(table.smallest_fraction - min(fractions)) > 1e-12:
        raise CheckpointError(
            f"{path}: the calibration table belongs to another model (its smallest achievable "
            f"budget is {table.smallest_fraction:.6f}, this model's {min(fractions):.6f})"
        )


def _swap_in(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target``, keeping the previous one until the new
    one is in place."""
    parent = target.parent
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD_MARK}", dir=parent))
        os.rmdir(old)  # only the unique name is wanted; rename needs it absent
        os.rename(target, old)
        _fsync_dir(parent)
    os.rename(new, target)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Run directories this process holds locked: resolved path -> [fd, depth]. flock belongs to an
# open file description, so a second os.open + flock of the same file in this process would be
# refused like another process; the nesting (the CLI around train(), train() itself) is counted.
_held_locks: dict[Path, list[int]] = {}
_held_locks_guard = threading.Lock()


@contextlib.contextmanager
def lock_run_dir(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the run directory's writer lock (creating the directory) for the ``with`` body.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``RUN_DIR/.lock``, the holder's pid written into the
    file. A second writer is refused at once: CheckpointError "RUN_DIR is in use by pid N". The
    kernel drops the lock when its process dies (even by SIGKILL), so the lock file a dead run
    leaves behind is simply locked again by the next one; the file is never deleted (unlinking a
    lock file lets two processes lock two different inodes). Re-entrant within one process.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    with _held_locks_guard:
        held = _held_locks.get(key)
        if held is not None:
            held[1] += 1
        else:
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(
                    f"{run_dir} is in use by {_lock_holder(run_dir / LOCK_FILE)}: another canet "
                    "process (train or calibrate) writes there; wait for it to finish"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _held_locks[key] = [fd, 1]
    try:
        yield run_dir
    finally:
        with _held_locks_guard:
            held = _held_locks[key]
            held[1] -= 1
            if held[1] == 0:
                del _held_locks[key]
                os.close(held[0])  # releases the flock


def _lock_holder(path: Path) -> str:
    """"pid N" from a held lock file (the holder writes it right after locking: retry briefly)."""
    for _ in range(20):
        with contextlib.suppress(OSError, ValueError):
            return f"pid {int(path.read_text(encoding='ascii').strip())}"
        time.sleep(0.01)
    return "another process (pid unknown)"


def cleanup_leftovers(directory: str | os.PathLike[str]) -> list[str]:
    """Finish or undo interrupted saves under ``directory``; returns what was done (messages).

    ``.X.tmp-*`` (a save that never completed) is deleted; ``.X.old-*`` is deleted when ``X``
    exists (the swap completed) and renamed back to ``X`` otherwise (the process died between
    the two renames, so it is the last complete checkpoint).
    """
    directory = Path(directory)
    actions: list[str] = []
    if not directory.is_dir():
        return actions
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not name.startswith(".") or not entry.is_dir():
            continue
        if _TMP_MARK in name:
            shutil.rmtree(entry, ignore_errors=True)
            actions.append(f"removed the incomplete save {entry}")
        elif _OLD_MARK in name:
            final = directory / name[1:].split(_OLD_MARK, 1)[0]
            if final.exists():
                shutil.rmtree(entry, ignore_errors=True)
                actions.append(f"removed the replaced checkpoint {entry}")
            else:
                os.rename(entry, final)
                actions.append(f"restored {final} from the interrupted save {entry}")
    if actions:
        _fsync_dir(directory)
    return actions


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory for ``path``: a checkpoint dir itself, or a run dir (its
    ``best/``, else ``last/``). Falls back, read-only, to ``.X.old-*`` when a save of ``X`` was
    interrupted between its two renames. Raises CheckpointError when there is none."""
    path = Path(path)
    # A run dir holds config.yaml too, so only these files mark a checkpoint dir itself.
    own_files = (MODEL_FILE, STATE_FILE, OPTIMIZER_FILE, VOCAB_FILE)
    if any((path / name).exists() for name in own_files):
        return path
    for candidate in (path, path / "best", path / "last"):
        if candidate is not path and candidate.is_dir():
            return candidate
        if not candidate.exists() and candidate.parent.is_dir():
            olds = sorted(candidate.parent.glob(f".{candidate.name}{_OLD_MARK}*"))
            if olds:
                return olds[-1]
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    raise CheckpointError(
        f"{path}: not a checkpoint directory: expected {MODEL_FILE} and the other checkpoint "
        f"files ({', '.join(REQUIRED_FILES)}) here or in {path}/best or {path}/last"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the checkpoint is incomplete (expected {', '.join(REQUIRED_FILES)})"
        )
    return path


def _read_state_json(directory: Path) -> dict[str, Any]:
    path = _require(directory, STATE_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable or corrupted JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("arch"), dict):
        raise CheckpointError(f"{path}: expected a JSON object with an 'arch' entry")
    identity = data.get("data")  # absent in checkpoints from before the data identity
    if identity is not None and not (
        isinstance(identity, dict)
        and isinstance(identity.get("sha256"), str) and len(identity["sha256"]) == 64
        and isinstance(identity.get("interactions"), int)
    ):
        raise CheckpointError(
            f"{path}: 'data' must be {{sha256: 64 hex digits, interactions: int}}, "
            f"got {str(identity)[:80]}"
        )
    return data


# --------------------------------------------------------------------------------------------
# Data identity
# --------------------------------------------------------------------------------------------


def data_identity(data: SequenceData) -> dict[str, Any]:
    """What identifies the data a run trained on: sha256 over the per-user item sequences
    after filtering and remapping (``offsets`` and ``items``, int64 little-endian) and their
    total length. The vocabulary alone is not enough: the same users and items in another
    order (e.g. a log without timestamps) give another leave-one-out split, so evaluation would
    score other targets and a resume could train on test targets."""
    digest = hashlib.sha256(b"canet split v1\0")
    for array in (data.offsets, data.items):
        digest.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
    return {"sha256": digest.hexdigest(), "interactions": int(len(data.items))}


def describe_data_change(stored: dict[str, Any] | None, data: SequenceData) -> str | None:
    """None when ``data`` is the split a checkpoint's ``data`` identity describes (or when the
    checkpoint predates data identities: then only its vocabulary can be compared), else a
    short account of the difference."""
    if stored is None:
        return None
    now = data_identity(data)
    if now["sha256"] == stored["sha256"]:
        return None
    if now["interactions"] != stored["interactions"]:
        how = f"{now['interactions']} interactions, trained on {stored['interactions']}"
    else:
        how = (f"the same {now['interactions']} interactions in other per-user sequences "
               "(e.g. other or no timestamps)")
    return (f"not the split the checkpoint was trained on: same users and items, but {how}; "
            f"split sha256 {now['sha256'][:12]}, trained on {stored['sha256'][:12]}")


def _check_digest(
    directory: Path, name: str, state: dict[str, Any], data: bytes | None = None
) -> None:
    """The file's sha256 (of ``data``, its bytes as already read, when given) must be the one
    trainer_state.json records."""
    expected = state.get("files_sha256", {}).get(name)
    path = _require(directory, name) if data is None else directory / name
    actual = _file_digest(path) if data is None else hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{path}: corrupted (its sha256 differs from the one recorded in {STATE_FILE})"
        )


def _read_safetensors(
    path: Path, data: bytes | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (or of its bytes ``data``, already read)."""
    try:
        if data is None:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        else:
            tensors = load_safetensors_bytes(data)
            header_size = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except Exception as error:  # safetensors raises its own error types for every corruption
        raise CheckpointError(
            f"{path}: truncated or corrupted safetensors file ({error})"
        ) from None
    return tensors, metadata


def load_model_weights(
    directory: str | os.PathLike[str], model: CANet | None = None, *, _data: bytes | None = None
) -> CANet:
    """Load ``directory/model.safetensors`` into ``model`` (or a new CANet built from the stored
    arch) and return it.

    Everything is validated BEFORE the model is touched: the arch in the metadata must equal
    ``model.arch``, every key of ``model.state_dict()`` must be present with the same shape and
    dtype (and no extra key), the tensor digest must match, and no value may be NaN/inf. On any
    problem CheckpointError names the file and ``model`` is left unchanged. (``_data``: the
    file's bytes, already read by :func:`load_checkpoint`.)
    """
    directory = Path(directory)
    path = _require(directory, MODEL_FILE) if _data is None else directory / MODEL_FILE
    tensors, metadata = _read_safetensors(path, _data)
    try:
        stored_arch = json.loads(metadata["arch"])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise CheckpointError(
            f"{path}: no canet architecture in the safetensors metadata; not a canet checkpoint"
        ) from None
    if model is None:
        try:
            model = CANet.from_arch(stored_arch).eval()  # a fresh model is for inference
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: invalid architecture in metadata: {error}") from None
    elif stored_arch != model.arch:
        raise CheckpointError(f"{path}: {describe_arch_change(stored_arch, model.arch)}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path}: tensors do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, reference in expected.items():
        got = tensors[name]
        if got.shape != reference.shape or got.dtype != reference.dtype:
            raise CheckpointError(
                f"{path}: tensor {name!r} expected {reference.dtype} {tuple(reference.shape)}, "
                f"got {got.dtype} {tuple(got.shape)}"
            )
    recorded = metadata.get("tensors_sha256")
    if recorded is not None and recorded != _tensors_digest(tensors):
        raise CheckpointError(f"{path}: corrupted tensor data (digest mismatch)")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN/inf")
    with torch.no_grad():
        for name, reference in expected.items():
            reference.copy_(tensors[name])
    return model


def describe_arch_change(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """A one-line account of how two ``model.arch`` dicts differ."""
    changes = [
        f"{key}: checkpoint {stored.get(key)!r} vs now {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]
    return "checkpoint is from another model architecture (" + "; ".join(changes) + ")"


# Reads retried when the checkpoint directory is swapped during the read, and the pauses
# between them (seconds): a swap is two renames, so a retry almost always finds it finished.
_READ_RETRY_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8)


def _identity(path: str | os.PathLike[str]) -> tuple[str, int, str] | None:
    """Which checkpoint ``path`` resolves to now: (directory, its inode, sha256 of its
    trainer_state.json); None when there is none. The state file differs between any two saves
    (epoch, history), so this tells saves apart even when a filesystem reuses the inode of a
    deleted checkpoint for the next one."""
    try:
        directory = resolve_checkpoint_dir(path)
        return str(directory), os.stat(directory).st_ino, _file_digest(directory / STATE_FILE)
    except (CheckpointError, OSError):
        return None


def load_checkpoint(
    path: str | os.PathLike[str], model: CANet | None = None
) -> Checkpoint:
    """Load a checkpoint (a checkpoint dir, or a run dir -> its best/) for inference.

    Safe beside a training run that saves into the same directory. Readers take no lock (a
    server must not block training, nor training a server); instead every file is checked
    against the digests in trainer_state.json, so a read that straddles a save's swap (state
    from the old checkpoint, weights from the new, or a directory that vanished mid-read) fails
    validation rather than mixing two checkpoints. Such a failure is retried, after a short
    pause, when the directory ``path`` resolves to changed during the read (a swap, not
    corruption: a corrupted checkpoint is reported at once); a successful read is retried when
    the resolution changed (e.g. ``best/`` was momentarily absent and ``last/`` was read), so
    what is returned is always one complete checkpoint, of the directory asked for. Each read
    takes every file into memory first, so only a swap during those few reads collides.
    """
    for pause in (*_READ_RETRY_PAUSES, None):
        before = _identity(path)
        try:
            loaded = _load_checkpoint_once(path, model)
        except (CheckpointError, OSError) as error:
            # OSError: a file vanished between its checks and its read (a swap's cleanup).
            swapped = _identity(path) != before
            if swapped and pause is None:
                raise CheckpointError(
                    f"{path}: replaced by a save during each of {len(_READ_RETRY_PAUSES) + 1} "
                    f"reads (a training run saves it faster than it can be read); last: {error}"
                ) from None
            if not swapped:
                if isinstance(error, OSError):
                    raise CheckpointError(
                        f"{error.filename or path}: unreadable ({error.strerror or error})"
                    ) from None
                raise
        else:
            after = _identity(path)
            if pause is None or after is None or (before is not None and after[0] == before[0]):
                return loaded
        time.sleep(pause)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _load_checkpoint_once(path: str | os.PathLike[str], model: CANet | None) -> Checkpoint:
    directory = resolve_checkpoint_dir(path)
    state = _read_state_json(directory)
    # Every file is read into memory right after the state, before the slow work (building the
    # model, digests): a save's swap can then only mix checkpoints within these few reads, and
    # then the digests catch it (load_checkpoint retries).
    digests = state.get("files_sha256") or {}
    listed = CALIBRATION_FILE in digests
    present = (directory / CALIBRATION_FILE).exists()
    if present and not listed:
        raise CheckpointError(
            f"{directory / CALIBRATION_FILE}: not listed in {STATE_FILE}'s digests (not written "
            "with this checkpoint); remove it, or run `canet calibrate` to write a valid one"
        )
    names = [CONFIG_FILE, VOCAB_FILE, MODEL_FILE] + ([CALIBRATION_FILE] if listed else [])
    raw = {}
    for name in names:
        if name == CALIBRATION_FILE and not (directory / name).is_file():
            raise CheckpointError(
                f"{directory / name}: missing, but listed in {STATE_FILE}; the checkpoint is "
                "incomplete (run `canet calibrate` to write the table again)"
            )
        raw[name] = _require(directory, name).read_bytes()
    for name in (CONFIG_FILE, VOCAB_FILE):
        _check_digest(directory, name, state, raw[name])
    config_path = directory / CONFIG_FILE
    try:
        mapping = yaml.safe_load(raw[CONFIG_FILE].decode("utf-8"))  # digest-checked: canet's
        if not isinstance(mapping, dict):
            raise CheckpointError(f"expected a YAML mapping, got {type(mapping).__name__}")
        config = config_from_dict(mapping, source=str(config_path))
    except (CanetError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{config_path}: invalid config: {error}") from None
    vocab_path = directory / VOCAB_FILE
    try:
        vocab = Vocab.from_json(raw[VOCAB_FILE].decode("utf-8"), source=str(vocab_path))
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{vocab_path}: unreadable ({error})") from None
    except CanetError as error:
        raise CheckpointError(str(error)) from None
    expected_arch = {
        "num_items": vocab.num_items,
        "max_len": config.max_len,
        "space": config.routing_space().to_dict(),
        "dropout": config.dropout,
        "router_dim": config.router_dim,
        "router_heads": config.router_heads,
        "residual_scaling": config.residual_scaling,
    }
    calibration = None
    if listed:
        calibration = _read_calibration(directory, state, raw[CALIBRATION_FILE], expected_arch)
    into_callers_model = model is not None
    if into_callers_model:
        # Every check runs before the caller's model is touched: a refused checkpoint leaves
        # it exactly as it was.
        if model.arch != expected_arch:
            raise CheckpointError(
                f"{directory}: " + describe_arch_change(expected_arch, model.arch)
            )
        _check_digest(directory, MODEL_FILE, state, raw[MODEL_FILE])
    model = load_model_weights(directory, model, _data=raw[MODEL_FILE])
    if model.arch != expected_arch:
        raise CheckpointError(
            f"{directory / MODEL_FILE}: does not belong with {CONFIG_FILE}/{VOCAB_FILE} here; "
            + describe_arch_change(model.arch, expected_arch)
        )
    if not into_callers_model:
        # A fresh model: checked after loading, so a model file from another run is reported
        # as such rather than as a digest mismatch.
        _check_digest(directory, MODEL_FILE, state, raw[MODEL_FILE])
    if vocab.num_items != model.num_items:
        raise CheckpointError(
            f"{vocab_path}: {vocab.num_items} items, but the model has {model.num_items}"
        )
    model.budget_table = calibration
    return Checkpoint(directory, model, config, vocab, state, calibration)


def _read_calibration(
    directory: Path, state: dict[str, Any], data: bytes, arch: dict[str, Any]
) -> BudgetTable:
    """The budget table of calibration.json's bytes ``data``: digest-checked, parsed,
    validated, and checked to be that of a model of ``arch``."""
    _check_digest(directory, CALIBRATION_FILE, state, data)
    path = directory / CALIBRATION_FILE
    try:
        table = BudgetTable.from_json(data.decode("utf-8"), source=str(path))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 text ({error.reason})") from None
    except BudgetError as error:
        raise CheckpointError(str(error)) from None
    _check_table_fits(table, arch, path)
    return table


def load_training_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict]:
    """(trainer_state.json, optimizer.pt contents) of a checkpoint, validated."""
    directory = Path(directory)
    state = _read_state_json(directory)
    _check_digest(directory, OPTIMIZER_FILE, state)
    path = directory / OPTIMIZER_FILE
    try:
        optimizer_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle errors have many types; all mean a bad file
        raise CheckpointError(f"{path}: truncated or corrupted ({error})") from None
    if not isinstance(optimizer_state, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(optimizer_state).__name__}")
    return state, optimizer_state


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state(generators: dict[str, torch.Generator]) -> tuple[dict, dict]:
    """(JSON-able python/numpy state, tensor state for optimizer.pt) of every RNG a run uses."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    json_state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensor_state = {"torch": torch.get_rng_state()}
    for name, generator in generators.items():
        tensor_state[f"generator.{name}"] = generator.get_state()
    return json_state, tensor_state


def restore_rng_state(
    json_state: dict, tensor_state: dict, generators: dict[str, torch.Generator]
) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor_state["torch"])
    for key, generator in generators.items():
        generator.set_state(tensor_state[f"generator.{key}"])
