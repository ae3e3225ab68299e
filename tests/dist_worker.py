"""One rank of a distributed test run: ``python tests/dist_worker.py ARGV...`` runs
``canet ARGV`` (the environment carries RANK, WORLD_SIZE, ...), optionally made to fail.

``CANET_TEST_FAIL=raise`` makes rank ``CANET_TEST_FAIL_RANK`` (default 1) raise a user error
in its second epoch, as a bad batch would; ``CANET_TEST_FAIL=hang`` makes it stop answering
there (it sleeps), so the other ranks must time out. Not part of the package: tests only."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canet import cli  # noqa: E402
from canet import train as train_module  # noqa: E402
from canet.errors import DataFormatError  # noqa: E402


def _inject(mode: str) -> None:
    real = train_module._Run.train_epoch

    def failing_epoch(self, *args, **kwargs):
        if self.epoch >= 1:
            if mode == "raise":
                raise DataFormatError("log.csv", 7, "a bad batch on purpose")
            time.sleep(600)
        return real(self, *args, **kwargs)

    train_module._Run.train_epoch = failing_epoch


if __name__ == "__main__":
    mode = os.environ.get("CANET_TEST_FAIL")
    if mode and os.environ.get("RANK") == os.environ.get("CANET_TEST_FAIL_RANK", "1"):
        _inject(mode)
    sys.exit(cli.main(sys.argv[1:]))
