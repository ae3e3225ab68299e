"""The Triton kernels' compile keys and their sm_90 builds, checked without a GPU.

``benches/kernel_report.py`` records the launches of real Triton-backend forwards on CPU
tensors (nothing runs) and compiles each specialization for sm_90 with the installed triton.
Skipped under ``TRITON_INTERPRET=1``, where the kernels are not JITFunctions.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import load_bench  # tests/ is on sys.path (rootdir conftest)

from canet import CANet, RoutingSpace

pytest.importorskip("triton")
from canet.backends import triton_backend  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1",
        reason="records and compiles real kernels; the interpreter replaces triton.jit",
    ),
    pytest.mark.skipif(
        (triton_backend._triton_version() or (0,)) < (3, 6),
        reason="benches/kernel_report.py needs triton >= 3.6",
    ),
]


@pytest.fixture
def report(monkeypatch):
    return load_bench("kernel_report", monkeypatch)


def test_one_compile_per_kernel_role_whatever_the_batch_size_or_layer(report):
    """A server that meets a new batch size must not stall on a Triton compile: ints that vary
    with the batch (rows, users, tile capacity) and the layer index are not part of the key.
    L = 1 and 13 share the attention block (16) too, so every forward needs the same keys."""
    space = RoutingSpace()
    batches, max_lens = [1, 2, 7, 8, 16, 40, 77], [1, 13]
    launches = report.record_forwards(["fp16"], batches, max_lens, [3001], space)
    forwards = {launch.case for launch in launches}
    assert len(forwards) == len(batches) * len(max_lens)
    # The recorder saw whole forwards: the backend's launch count, 3 + 5 per block.
    assert len(launches) == len(forwards) * (3 + 5 * space.max_depth)
    specs = report.specializations(launches)
    for spec in specs:
        assert sorted(spec.cases) == sorted(forwards), (
            f"{spec.name} compiles again for some forwards only: {spec.cases}"
        )
    # plan, input projection, and per block qkv, attention, out-proj+LN, FFN1, FFN2+LN, scores
    assert len(specs) == 8, [report._variant(s) for s in specs]


def test_row_slices_of_a_batch_add_no_compile(report):
    """The engine scores big batches in row slices (Engine._recommend_dense): a slice that starts
    at an odd row is not 16-byte aligned, and must not compile the kernels again."""
    space = RoutingSpace()
    model = CANet(37, 13, space=space).to(torch.float16).eval()
    with report.recording_launches() as launches:
        backend = triton_backend.Backend(model.arch, model.state_dict(), torch.device("cpu"))
        seqs = torch.ones(2 * 419, 13, dtype=torch.int64)
        ids = torch.arange(2 * 419) % len(space)
        for rows in (slice(0, 419), slice(419, None)):
            assert seqs[rows].data_ptr() % 16 == (0 if rows.start == 0 else 8)
            backend.scores_from_ids(seqs[rows], ids[rows])
            for launch in launches:
                launch.case = launch.case or f"rows {rows.start}"
    specs = report.specializations(launches)
    assert all(len(spec.cases) == 2 for spec in specs), [
        (report._variant(spec), spec.cases) for spec in specs
    ]


def test_recording_needs_the_compiled_kernels(report, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        report.record_forwards(["fp32"], [1], [1], [5])


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_within_its_shared_memory(report, tmp_path, monkeypatch):
    """fp32, fp16 and bf16 (the interpreter cannot check bf16 at all), one user with L = 1:
    each specialization compiles for sm_90, fits the per-block shared memory, and the report
    says so in its files."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    status = report.main(["--dtypes", "fp32", "fp16", "bf16", "--batch", "1", "--max-len", "1",
                          "--items", "37", "--no-cuda", "--out", str(tmp_path), "--name", "r"])
    result = json.loads((tmp_path / "r.json").read_text())
    rows = result["triton"]
    assert status == 0, [row for row in rows if "error" in row or not row.get("shared_fits")]
    assert len(rows) == 1 + 3 * 7  # the plan kernel reads no floats: one for all dtypes
    for row in rows:
        assert row["shared_fits"] and 0 < row["shared_bytes"] <= 232448, row
        assert 0 < row["registers"] <= 255 and row["num_warps"] in (4, 8), row
        assert row["spill_store_bytes"] >= 0 and row["int_keys"], row
    assert {row["variant"].split()[0] for row in rows if row["kernel"] != "plan_kernel"} == {
        "fp32", "fp16", "bf16"
    }
    text = (tmp_path / "r.md").read_text()
    assert "22 specializations from 3 forwards" in text and "Skipped (--no-cuda)" in text


def test_ptxas_output_is_parsed_per_function(report):
    text = """ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 6400 bytes smem
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""
    assert report._parse_ptxas(text) == [
        {"function": "k1", "spill_store_bytes": 4, "spill_load_bytes": 12, "registers": 40,
         "static_shared_bytes": 6400},
        {"function": "k2", "spill_store_bytes": 0, "spill_load_bytes": 0, "registers": 255,
         "static_shared_bytes": 0},
    ]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernels_report_registers_without_spills(report):
    rows = report.cuda_kernel_report(90)
    names = {row["function"] for row in rows}
    assert {"plan_kernel", "merge_kernel", "score_chunk_kernel<float>",
            "score_chunk_kernel<__half>", "score_chunk_kernel<__nv_bfloat16>"} <= names, rows
    for row in rows:
        assert "error" not in row and 0 < row["registers"] <= 255, row
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, row


def test_arguments_are_checked(report):
    for bad in (["--batch", "0"], ["--name", "a/b"], ["--dtypes", "int8"]):
        with pytest.raises(SystemExit):
            report.parse_args(bad)
    assert torch.float16 in report.DTYPES.values()
