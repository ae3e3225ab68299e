"""What the commands write: metrics JSON and per-user rank CSVs, always atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from ..data import Vocab

__all__ = ["write_metrics", "write_ranks"]


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``metrics`` as JSON to ``path`` (atomically: temporary file, then rename)."""
    return write_text_atomic(json.dumps(metrics, indent=1), path)


def write_ranks(per_user: dict[str, Any], vocab: Vocab, path: str | os.PathLike[str]) -> Path:
    """Per-user ranks as CSV ``user_id,item_id,rank`` in EXTERNAL ids, ``rank`` 1-based (1 =
    the target was the top recommendation); written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["user_id", "item_id", "rank"])
    for user, item, rank in zip(per_user["users"].tolist(), per_user["targets"].tolist(),
                                per_user["ranks"].tolist(), strict=True):
        writer.writerow([vocab.user_tokens[user], vocab.item_tokens_list[item - 1], rank + 1])
    return write_text_atomic(buffer.getvalue(), path)
