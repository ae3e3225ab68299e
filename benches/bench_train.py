"""pytest-benchmark suite: training steps of CANet and the full-size model, the current step
against the pre-issue-13 step, on the seeded synthetic training log of ``canet bench --train``
(:mod:`canet.bench.training`; smaller here: 5,000 users, so the suite stays short).

Each benchmark times a fixed number of training steps through :func:`canet.train.time_training`
(the loop of ``canet train`` without validation or checkpoints); the four cases share one
group, so pytest-benchmark prints them side by side. A timed call also builds the model and its
optimizer (tens of milliseconds, small next to the steps); ``extra_info`` holds the loop's own
``seconds_per_step``. ``canet bench --train`` gives the full
report (seconds per epoch, targets/s, fraction of the FLOP limit) on the 30,000-user log.
"""

from __future__ import annotations

import pytest
import torch

from canet.bench.training import TRAIN_BATCH, TRAIN_MAX_LEN, training_data
from canet.config import config_from_dict
from canet.train import time_training

STEPS = {"new": 8, "old": 2}


@pytest.fixture(scope="module")
def train_data():
    return training_data(num_users=5_000)


@pytest.mark.parametrize("path", ["new", "old"])
@pytest.mark.parametrize("model", ["canet", "full"])
def test_training_steps(benchmark, train_data, model: str, path: str):
    config = config_from_dict({
        "max_len": TRAIN_MAX_LEN, "batch_size": TRAIN_BATCH, "progress": False,
        "fixed_config": None if model == "canet" else "largest",
    })
    records = []

    def steps():
        records.append(time_training(config, train_data, steps=STEPS[path],
                                     reference_step=path == "old"))

    benchmark.group = "training steps"
    benchmark.pedantic(steps, rounds=2, iterations=1, warmup_rounds=0)
    record = records[-1]
    benchmark.extra_info.update(
        model=model, path=path, steps=record["steps"], targets=record["targets"],
        seconds_per_step=record["train_seconds"] / record["steps"],
        targets_per_second=record["targets_per_second"], threads=torch.get_num_threads(),
    )
