"""Tests for canet.evaluate: model vs Engine, batch-size independence, protocol, FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from canet.cli.output import write_metrics
from canet.config import config_from_dict
from canet.data import build_dataset, synthetic_log
from canet.errors import CanetError
from canet.evaluate import evaluate, format_histogram
from canet.flops import flops
from canet.train import build_model

TINY = {"max_len": 8, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2}


@pytest.fixture(scope="module")
def setup():
    config = config_from_dict(TINY)
    data = build_dataset(synthetic_log(70, 25, 1, seq_len=(5, 20)), config.max_len)
    torch.manual_seed(0)
    model = build_model(config, data.num_items).eval()
    with torch.no_grad():  # spread the routing over several configs
        model.router.head.weight.normal_(0, 2.0)
    return data, model


def test_model_and_engine_give_identical_metrics(setup) -> None:
    data, model = setup
    through_model = evaluate(model, data, "test", backend="model")
    through_engine = evaluate(model, data, "test", backend="torch")
    assert through_engine["backend"] == "torch" and through_model["backend"] == "model"
    assert through_model["metrics"] == through_engine["metrics"]
    assert through_model["routing"] == through_engine["routing"]
    assert sum(1 for n in through_model["routing"]["histogram"] if n) > 1


def test_results_do_not_depend_on_batch_size(setup) -> None:
    data, model = setup
    big = evaluate(model, data, "valid", batch_size=512)
    small = evaluate(model, data, "valid", batch_size=7)
    assert big["metrics"] == pytest.approx(small["metrics"], abs=1e-12)
    assert big["routing"]["histogram"] == small["routing"]["histogram"]


def test_report_contents_and_flops(setup, tmp_path) -> None:
    data, model = setup
    result = evaluate(model, data, "test", ks=(5, 10, 20))
    assert result["num_users"] == len(data.eval_users("test"))
    assert result["num_items"] == data.num_items
    assert {f"{m}@{k}" for m in ("recall", "ndcg", "mrr", "hit") for k in (5, 10, 20)} == set(
        result["metrics"]
    )
    assert result["protocol"]["padding_excluded"] is True
    assert "input window" in result["protocol"]["exclude_history"]
    histogram = result["routing"]["histogram"]
    per_config = [flops(c, model.max_len, model.num_items) for c in model.space.configs]
    expected = sum(n * f for n, f in zip(histogram, per_config, strict=True)) / sum(histogram)
    assert result["flops"]["mean_per_user"] == pytest.approx(expected)
    assert result["flops"]["reduction_vs_largest"] == pytest.approx(1 - expected / per_config[-1])
    path = write_metrics(result, tmp_path / "metrics.json")
    assert json.loads(path.read_text())["protocol"]["ks"] == [5, 10, 20]
    assert "%" in format_histogram(histogram)


def test_fixed_config_and_history_switch(setup) -> None:
    data, model = setup
    fixed = evaluate(model, data, "test", fixed_config_id=model.space.largest_id)
    assert fixed["routing"]["histogram"][-1] == fixed["num_users"]
    assert fixed["flops"]["reduction_vs_largest"] == 0.0
    kept = evaluate(model, data, "test", exclude_history=False)
    assert kept["protocol"]["exclude_history"] is False
    assert kept["metrics"] != evaluate(model, data, "test")["metrics"]


def test_shuffled_routing_keeps_the_histogram_and_deals_it_out_at_random(setup) -> None:
    data, model = setup
    routed = evaluate(model, data, "test")
    shuffled = evaluate(model, data, "test", shuffle_routing_seed=3, batch_size=9)
    again = evaluate(model, data, "test", shuffle_routing_seed=3, batch_size=64)
    assert shuffled["routing"]["histogram"] == routed["routing"]["histogram"]
    assert shuffled["flops"]["mean_per_user"] == routed["flops"]["mean_per_user"]
    assert shuffled["flops"]["router_per_user"] == 0
    assert "random" in shuffled["routing"]["mode"]
    assert shuffled["metrics"] == pytest.approx(again["metrics"], abs=1e-12)
    # The users really got other configs: the per-user choices differ from the router's.
    users = torch.cat([seqs for _, seqs, _ in data.eval_batches("test", 64)])
    router_ids = model.route(users)
    generator = torch.Generator().manual_seed(3)
    dealt = router_ids[torch.randperm(len(router_ids), generator=generator)]
    assert (dealt != router_ids).any()
    with pytest.raises(CanetError, match="not both"):
        evaluate(model, data, "test", shuffle_routing_seed=1, fixed_config_id=0)


def test_per_user_ranks_reproduce_the_metrics_and_standard_errors(setup) -> None:
    data, model = setup
    result = evaluate(model, data, "test", per_user=True, batch_size=9)
    per_user = result["per_user"]
    users = data.eval_users("test")
    assert per_user["users"].tolist() == sorted(users.tolist())
    _, _, targets = zip(*data.eval_batches("test", 1000), strict=True)
    assert per_user["targets"].tolist() == torch.cat(targets).tolist()
    ranks = per_user["ranks"].astype(np.float64)
    ndcg = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    assert result["metrics"]["ndcg@10"] == pytest.approx(ndcg.mean(), abs=1e-12)
    expected_se = ndcg.std(ddof=1) / np.sqrt(len(ndcg))
    assert result["standard_errors"]["ndcg@10"] == pytest.approx(expected_se, rel=1e-9)
    hits = (ranks < 5).astype(np.float64)
    assert result["standard_errors"]["recall@5"] == pytest.approx(
        hits.std(ddof=1) / np.sqrt(len(hits)), rel=1e-9
    )
    assert "per_user" not in evaluate(model, data, "test")


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ml100k-tiny-b98b0d9"
ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k.inter"


@pytest.mark.skipif(not ML100K.exists(), reason=f"needs {ML100K} (../shared/data)")
def test_a_checkpoint_saved_before_the_training_rewrite_evaluates_as_it_did() -> None:
    """A checkpoint trained and evaluated by canet at b98b0d9 (before the layered package and the
    fast training step): today's code loads it and gives the same test metrics, standard
    errors, routing and FLOPs (the fixture's expected_test_metrics.json says how it was made)."""
    from canet.checkpoint import load_checkpoint
    from canet.data import load_dataset

    expected = json.loads((FIXTURE / "expected_test_metrics.json").read_text())
    loaded = load_checkpoint(FIXTURE)
    config = loaded.config
    data = load_dataset(ML100K, **config.dataset_options())
    got = evaluate(loaded.model, data, "test", ks=config.ks,
                   exclude_history=config.exclude_history, batch_size=256)
    assert got["num_users"] == expected["num_users"]
    assert got["routing"]["histogram"] == expected["routing"]["histogram"]
    assert got["metrics"] == pytest.approx(expected["metrics"], rel=1e-9, abs=1e-12)
    assert got["standard_errors"] == pytest.approx(expected["standard_errors"], rel=1e-9)
    assert got["flops"] == pytest.approx(expected["flops"], rel=1e-12)
