"""Tests for canet.Recommender: external ids in and out, unknown items, truncation."""

from __future__ import annotations

import json

import pytest
import torch

import canet
from canet.config import config_from_dict
from canet.data import build_dataset, synthetic_log
from canet.recommender import Recommender, read_histories
from canet.train import train

TINY = {"max_len": 8, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2, "epochs": 1, "batch_size": 32, "progress": False,
        "threads": 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    data = build_dataset(synthetic_log(40, 20, 2, seq_len=(5, 12)), TINY["max_len"])
    train(config_from_dict(TINY), data, path, log=lambda _: None)
    return path


@pytest.fixture(scope="module")
def rec(run_dir):
    return canet.Recommender.from_pretrained(run_dir, backend="torch")


def test_recommend_list_and_dict_with_external_ids(rec) -> None:
    histories = [["i1", "i2", "i3"], ["i5"]]
    as_list = rec.recommend(histories, k=5)
    as_dict = rec.recommend({"alice": histories[0], "bob": histories[1]}, k=5)
    assert as_dict == {"alice": as_list[0], "bob": as_list[1]}
    items = [item for item, _ in as_list[0]]
    assert len(items) == 5 and not {"i1", "i2", "i3"} & set(items)
    scores = [score for _, score in as_list[0]]
    assert scores == sorted(scores, reverse=True)
    with_history = rec.recommend(histories, k=rec.vocab.num_items, exclude_history=False)
    assert len(with_history[0]) == rec.vocab.num_items


def test_matches_the_model_scores(rec) -> None:
    history = ["i3", "i4", "i7", "i3"]
    ids, _ = rec.vocab.item_ids(history)
    seqs = torch.zeros(1, rec.max_len, dtype=torch.int64)
    seqs[0, -len(ids):] = torch.from_numpy(ids)
    scores = rec.model.score(seqs)[0]
    scores[torch.from_numpy(ids)] = float("-inf")
    expected = rec.vocab.item_tokens(scores.topk(3).indices)
    assert [item for item, _ in rec.recommend([history], k=3)[0]] == expected


def test_long_history_keeps_the_most_recent_items(rec) -> None:
    recent = ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"]
    long = ["i9", "i10", "i11"] + recent
    a = rec.recommend([long], k=4, exclude_history=False)[0]
    b = rec.recommend([recent], k=4, exclude_history=False)[0]
    assert a == b


def test_unknown_items_are_reported_and_empty_histories_refused(rec) -> None:
    with pytest.warns(UserWarning, match="unknown item token"):
        result = rec.recommend({"u": ["i1", "nope", "i2"]}, k=3)
    assert rec.last_unknown == {"u": ["nope"]} and len(result["u"]) == 3
    with pytest.raises(ValueError, match="no item known"):
        rec.recommend({"new": []}, k=3)
    with pytest.raises(ValueError, match="'ghost' has no item known"):
        rec.recommend({"ghost": ["x", "y"]}, k=3)
    assert rec.recommend({"new": [], "u": ["i1"]}, k=2, on_empty="skip")["new"] == []
    with pytest.raises(ValueError, match="k must be"):
        rec.recommend([["i1"]], k=0)
    with pytest.raises(ValueError, match="list of item tokens"):
        rec.recommend(["i1", "i2"], k=2)


def test_read_histories_json_and_log(tmp_path) -> None:
    as_json = tmp_path / "h.json"
    as_json.write_text(json.dumps({"a": ["i1", 2], "b": ["i3"]}))
    assert read_histories(as_json) == {"a": ["i1", "2"], "b": ["i3"]}
    as_list = tmp_path / "l.json"
    as_list.write_text(json.dumps([["i1"], ["i2", "i3"]]))
    assert read_histories(as_list) == {"0": ["i1"], "1": ["i2", "i3"]}
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\nx,i2,5\nx,i1,1\ny,i3,2\n")
    assert read_histories(log) == {"x": ["i1", "i2"], "y": ["i3"]}


def test_read_histories_accepts_a_utf8_bom(tmp_path) -> None:
    # Logs accepted a byte-order mark; JSON histories were refused with one.
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": ["i1", 2]}).encode())
    assert read_histories(as_json) == {"a": ["i1", "2"]}
    unnamed = tmp_path / "bom.txt"  # detected by content, not by the name
    unnamed.write_bytes(b"\xef\xbb\xbf" + json.dumps([["i1"]]).encode())
    assert read_histories(unnamed) == {"0": ["i1"]}


def test_backend_model_is_the_torch_computation(run_dir) -> None:
    # `canet evaluate --backend model` is the PyTorch computation; recommend accepts it too.
    rec = canet.Recommender.from_pretrained(run_dir, backend="model")
    assert rec.backend == "torch"
    reference = canet.Recommender.from_pretrained(run_dir, backend="torch")
    history = {"u": ["i1", "i2", "i3"]}
    assert rec.recommend(history, k=5) == reference.recommend(history, k=5)


def test_recommender_class_is_exported() -> None:
    assert canet.Recommender is Recommender


def test_recommender_leaves_the_callers_model_mode_alone(rec) -> None:
    model = rec.model
    model.train()
    try:
        fresh = Recommender(model, rec.vocab, backend="torch")
        assert model.training, "Recommender switched the caller's model to eval mode"
        # The engine never runs dropout, whatever the model's mode.
        history = [["i3", "i4", "i7"]]
        assert fresh.recommend(history, k=4) == rec.recommend(history, k=4)
    finally:
        model.eval()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_from_pretrained_on_an_unavailable_device_is_a_canet_error(run_dir) -> None:
    # Before: an AssertionError from torch ("Torch not compiled with CUDA enabled").
    with pytest.raises(canet.errors.CanetError, match="CUDA is not available"):
        canet.Recommender.from_pretrained(run_dir, device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        canet.Recommender.from_pretrained(run_dir, device="gpu")
