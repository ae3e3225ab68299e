"""canet.bench: routing-mix generators, the efficiency arithmetic, target verdicts, the
timer, the dtype rule of the GPU benchmark's guard, and a ``canet bench --quick`` run on a tiny
shape (timings themselves are never asserted)."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import canet
from canet import CANet, Engine, RoutingSpace, bench
from canet.flops import batch_flops

SPACE = RoutingSpace()
ROOT = Path(__file__).resolve().parents[1]
BENCHES = ROOT / "benches"


@pytest.fixture(autouse=True)
def one_thread():
    """Nothing here is timed against a bound, so run on one thread: on a busy machine torch's
    worker threads wait on each other and a tiny forward can take seconds. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mix", bench.MIXES)
def test_mixes_are_seeded_and_deterministic(mix):
    first = bench.make_config_ids(mix, 64, SPACE, seed=3)
    again = bench.make_config_ids(mix, 64, SPACE, seed=3)
    assert first.dtype == torch.int64 and first.shape == (64,)
    assert torch.equal(first, again)
    assert 0 <= int(first.min()) and int(first.max()) < SPACE.n_configs


@pytest.mark.parametrize("mix", ["paper", "uniform"])
def test_random_mixes_change_with_the_seed(mix):
    assert not torch.equal(
        bench.make_config_ids(mix, 64, SPACE, seed=0), bench.make_config_ids(mix, 64, SPACE, seed=1)
    )


def test_smallest_and_largest_are_exact():
    assert bench.make_config_ids("smallest", 9, SPACE).tolist() == [SPACE.smallest_id] * 9
    assert bench.make_config_ids("largest", 9, SPACE).tolist() == [SPACE.largest_id] * 9


def test_paper_mix_costs_35_to_45_percent_of_the_largest():
    weights = bench.paper_weights(SPACE)
    fractions = bench.config_fractions(SPACE, bench.SEQ_LEN, bench.NUM_ITEMS)
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights @ fractions).item() == pytest.approx(bench.PAPER_FLOPS_FRACTION, abs=1e-6)
    ids = bench.make_config_ids("paper", 512, SPACE)
    realised = batch_flops(bench.config_histogram(ids, SPACE), SPACE, bench.SEQ_LEN,
                           bench.NUM_ITEMS) / (
        512 * batch_flops(bench.config_histogram(torch.tensor([SPACE.largest_id]), SPACE),
                          SPACE, bench.SEQ_LEN, bench.NUM_ITEMS)
    )
    assert 0.35 <= realised <= 0.45
    # Most users run a config cheaper than the mean cost: the FLOPs are skewed toward small.
    assert fractions[ids].median().item() < realised
    cheapest_third = fractions.argsort()[: len(fractions) // 3]
    assert torch.isin(ids, cheapest_third).float().mean() > 0.5


def test_unknown_mix_and_unreachable_target_are_rejected():
    with pytest.raises(ValueError, match="unknown routing mix"):
        bench.make_config_ids("heavy", 4, SPACE)
    with pytest.raises(ValueError, match="target FLOPs fraction"):
        bench.paper_weights(SPACE, target=0.01)


def test_routed_flops_match_the_engine_count():
    model = bench.build_model(num_items=20, seq_len=5)
    ids = bench.make_config_ids("paper", 16, model.space, seq_len=5, num_items=20)
    engine = Engine(model, backend="torch")
    engine.score(bench.make_sequences(16, num_items=20, seq_len=5), ids)
    assert engine.last_plan.flops == batch_flops(bench.config_histogram(ids, model.space),
                                                 model.space, 5, 20)


def test_efficiency_arithmetic_on_hand_made_timings():
    # All-largest costs 4x the routed FLOPs: ideal speedup 4.
    assert bench.ideal_speedup(400, 100) == 4.0
    assert bench.speedup(2.0, 0.5) == 4.0
    assert bench.efficiency(largest_s=2.0, routed_s=1.0, ideal=4.0) == 0.5
    seconds = {
        "supernet_dense": 3.0, "masked": 6.0, "supernet_routed": 1.5,
        "cpu": 0.5, "cpu_largest": 2.0, "torch": 1.0,  # torch_largest missing on purpose
    }
    metrics = bench.case_metrics(seconds, flops_routed=100, flops_largest=400,
                                 backends=["cpu", "torch"])
    assert metrics["ideal_speedup"] == 4.0
    assert metrics["flops_fraction"] == 0.25
    cpu = metrics["backends"]["cpu"]
    assert cpu["speedup_vs_largest"] == 4.0
    assert cpu["efficiency"] == 1.0
    assert cpu["speedup_vs_dense"] == 6.0
    assert cpu["speedup_vs_masked"] == 12.0
    assert cpu["speedup_vs_supernet_routed"] == 3.0
    torch_entry = metrics["backends"]["torch"]
    assert "efficiency" not in torch_entry and torch_entry["speedup_vs_dense"] == 3.0
    with pytest.raises(ValueError):
        bench.ideal_speedup(400, 0)


def _case(mix, batch, **backends):
    return {"mix": mix, "batch": batch, "backends": backends}


def test_target_verdicts():
    cases = [
        _case("paper", 512, cpu={"efficiency": 0.97, "speedup_vs_dense": 2.0,
                                 "speedup_vs_masked": 5.0},
              torch={"speedup_vs_dense": 1.2}),
        _case("uniform", 512, torch={"speedup_vs_dense": 0.9}),
    ]
    verdicts = {(v["target"], v["mix"]): v for v in bench.evaluate_targets(cases)}
    assert verdicts["cpu-efficiency-paper-B512", "paper"]["status"] == "met"
    assert verdicts["cpu-vs-dense-paper-B512", "paper"]["status"] == "missed"
    assert verdicts["cpu-vs-masked-paper-B512", "paper"]["status"] == "met"  # >= is met
    assert verdicts["cpu-efficiency-paper-B8", "paper"]["status"] == "not measured"
    assert verdicts["cpu-vs-supernet-routed-B1", None]["status"] == "not measured"
    assert verdicts["torch-vs-dense-B512", "paper"]["status"] == "met"
    assert verdicts["torch-vs-dense-B512", "uniform"]["status"] == "missed"

    absent = bench.evaluate_targets([_case("paper", 512, torch={"speedup_vs_dense": 1.1})],
                                    skipped={"cpu": "not built"})
    cpu_verdicts = [v for v in absent if v["backend"] == "cpu" and v["batch"] == 512]
    assert cpu_verdicts and all(
        v["status"] == "not measured" and v["reason"] == "not built" for v in cpu_verdicts
    )


def test_quick_cli_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "results" / "cpu-test.json"
    argv = ["--quick", "--items", "40", "--seq-len", "6", "--batch", "1,3",
            "--mix", "paper,largest", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"schema", "machine", "settings", "results", "targets"}
    assert set(report["machine"]) >= {"cpu_model", "cpu_count", "torch", "torch_threads",
                                      "canet", "git", "date"}
    assert report["machine"]["torch_threads"] == 1
    settings = report["settings"]
    cpu_reason = bench.available_backends(["cpu"])[1].get("cpu")
    if cpu_reason is None:
        assert "cpu" in settings["backends_run"]
    else:
        assert settings["backends_skipped"] == {"cpu": cpu_reason}
        assert f"skipping the cpu backend: {cpu_reason}" in capsys.readouterr().err
    assert [(c["mix"], c["batch"]) for c in report["results"]] == [
        ("paper", 1), ("largest", 1), ("paper", 3), ("largest", 3)
    ]
    for case in report["results"]:
        assert set(case) >= {"flops_routed", "flops_largest", "flops_fraction", "ideal_speedup",
                             "timings", "backends", "histogram"}
        assert set(case["timings"]) >= {"supernet_dense", "masked", "supernet_routed", "torch",
                                        "torch_largest"}
        assert set(case["backends"]["torch"]) >= {"users_per_s", "efficiency",
                                                 "speedup_vs_dense", "speedup_vs_masked",
                                                 "max_rel_error"}
        assert case["backends"]["torch"]["max_rel_error"] < 1e-4
    assert {v["status"] for v in report["targets"]} <= {"met", "missed", "not measured"}
    markdown = out.with_suffix(".md").read_text()
    assert "| mix | B |" in markdown and "## Targets" in markdown


def test_plot_without_matplotlib_fails_with_a_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert bench.main(["--quick", "--plot", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()  # failed before measuring anything


def test_time_call_respects_the_minimum_repeats():
    calls = []
    timing = bench.time_call(lambda: calls.append(1), min_time=0.0, min_repeats=4,
                             warmup_time=0.0)
    assert len(timing.times) == 4 and len(calls) == 5  # one warm-up call, four timed
    assert timing.median >= 0.0


def test_time_repeats_counts_warmup_and_timed_calls_exactly():
    calls = []
    timing = bench.time_repeats(lambda: calls.append(1), 3, warmup_calls=0)
    assert len(timing.times) == 3 and len(calls) == 3
    timing = bench.time_repeats(lambda: calls.append(1), 2, warmup_calls=4)
    assert len(timing.times) == 2 and len(calls) == 3 + 6
    for bad in ({"clock": "gpu"}, {"min_repeats": 0}, {"warmup_calls": -1}):
        with pytest.raises(ValueError):
            bench.time_call(lambda: None, **bad)


def test_cuda_clock_reads_event_pairs_after_a_synchronized_warmup(monkeypatch):
    """The GPU scripts' timing path, with fake CUDA events: one device sync after the warm-up
    (queued warm-up work is not timed), then per call the end event's wait and the event pair's
    milliseconds, reported in seconds."""
    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("wait")

        def elapsed_time(self, end):
            return 2.5  # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    timing = bench.time_repeats(lambda: log.append("call"), 2, warmup_calls=1, clock="cuda")
    assert timing.times == (0.0025, 0.0025) and timing.median == 0.0025
    assert log == ["call", "sync"] + ["record", "call", "record", "wait"] * 2


def test_committed_cpu_results_still_render_to_their_markdown():
    """The report writer reads the committed JSON and writes the committed table unchanged."""
    for path in sorted((BENCHES / "results").glob("cpu-*.json")):
        report = json.loads(path.read_text())
        assert bench.markdown(report) == path.with_suffix(".md").read_text(), path


def test_only_the_entry_point_parses_arguments():
    """``import canet.bench`` leaves the command line unimported; no other module of the
    package uses argparse; benches/ scripts import canet.bench without sys.path edits."""
    code = ("import sys, canet.bench; "
            "assert 'canet.bench.__main__' not in sys.modules; print(canet.bench.main)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for path in sorted((ROOT / "canet" / "bench").glob("*.py")):
        imported = {alias.name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert ("argparse" in imported) == (path.name == "__main__.py"), path
    for path in sorted(BENCHES.glob("*.py")):
        assert "sys.path" not in path.read_text(), path


def test_python_dash_m_canet_bench_help():
    proc = subprocess.run([sys.executable, "-m", "canet.bench", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr


# -- the GPU benchmark's CPU-testable parts ---------------------------------------------------
def load_script(name, monkeypatch):
    """A fresh copy of benches/<name>.py (it needs no CUDA to import)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_bench_script_uses_the_one_dtype_map(monkeypatch):
    for name in ("gpu_bench", "bench_ops_gpu", "kernel_report"):
        assert load_script(name, monkeypatch).DTYPES is bench.DTYPES, name


def test_gpu_bench_model_has_non_trivial_residual_scales(monkeypatch):
    """The model's default 1e-8 residual scales make every block an identity, which would hide
    any attention or FFN error from the benchmark's correctness check."""
    gpu_bench = load_script("gpu_bench", monkeypatch)
    model = gpu_bench.build_model(37, 6, SPACE, torch.float16, device="cpu")
    scales = [p for name, p in model.named_parameters() if "res_scale" in name]
    assert len(scales) == 2 * SPACE.max_depth
    assert all(0.5 <= float(p) <= 1.0 for p in scales)
    assert model.supernet.out.weight.dtype == torch.float16 and not model.training


def _scaled_block_weights(model: CANet, part: str, factor: float) -> CANet:
    """A copy of ``model`` whose ``part`` weights in every supernet block are off by
    ``factor``: what a wrong attention or FFN kernel does."""
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in wrong.named_parameters():
            if name.startswith("supernet.blocks.") and f".{part}.weight" in name:
                param.mul_(factor)
    return wrong


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("part", ["ffn.fc2", "attn.out"])
def test_gpu_bench_guard_sees_errors_inside_the_blocks(monkeypatch, dtype, part):
    """The torch backend stands in for the triton one. Right scores pass the guard; scores of
    blocks 2% off pass the old guard (0.1 of the torch backend's largest score, on the default
    init) and fail the new one (the dtype rule, on the benchmark's model)."""
    gpu_bench = load_script("gpu_bench", monkeypatch)
    seqs = bench.make_sequences(12, num_items=37, seq_len=6)
    ids = bench.make_config_ids("uniform", 12, SPACE, seq_len=6, num_items=37)

    model = gpu_bench.build_model(37, 6, SPACE, dtype, device="cpu")
    right = Engine(model, backend="torch").score(seqs, ids)
    fields = gpu_bench.check_cell_scores(right, model, seqs, ids)
    assert fields["ok"] is True and fields["check"]["error"] <= fields["check"]["bound"]
    wrong = Engine(_scaled_block_weights(model, part, 1.02), backend="torch").score(seqs, ids)
    fields = gpu_bench.check_cell_scores(wrong, model, seqs, ids)
    assert fields["ok"] is False, fields
    assert bench.max_relative_error(wrong.float(), right.float()) <= 0.1  # the old tolerance

    torch.manual_seed(0)
    default_init = CANet(37, 6, SPACE).to(dtype).eval()
    old_want = Engine(default_init, backend="torch").score(seqs, ids).float()
    old_got = Engine(_scaled_block_weights(default_init, part, 1.02), backend="torch").score(
        seqs, ids).float()
    assert bench.max_relative_error(old_got, old_want) <= 0.1  # the old guard: passed
    assert bench.max_relative_error(old_got, old_want) < 1e-6  # blocks were identities


def test_score_check_rejects_mismatched_inputs():
    model = bench.build_model(num_items=20, seq_len=5)
    seqs = bench.make_sequences(3, num_items=20, seq_len=5)
    ids = bench.make_config_ids("uniform", 3, model.space, seq_len=5, num_items=20)
    with torch.inference_mode():
        scores = model.score(seqs, ids)
    with pytest.raises(ValueError, match="model's dtype"):
        bench.check_scores(scores.half(), model, seqs, ids)
    with pytest.raises(ValueError, match="one shape"):
        bench.max_relative_error(scores[:, :5], scores)
    nan = scores.clone()
    nan[0, 3] = float("nan")
    assert not bench.check_scores(nan, model, seqs, ids).ok


# -- training throughput (canet bench --train) -----------------------------------------------


def test_training_log_is_seeded_and_heavy_tailed() -> None:
    from canet.bench.training import training_log

    a, b = training_log(2000, 500, seed=3), training_log(2000, 500, seed=3)
    assert (a.users == b.users).all() and (a.items == b.items).all()
    assert not (training_log(2000, 500, seed=4).items[:100] == a.items[:100]).all()
    _, counts = np.unique(a.users.astype(str), return_counts=True)
    assert counts.min() >= 5 and 7 <= counts.mean() <= 11 and counts.max() > 50


def test_measure_training_reports_every_run_and_the_flop_fraction(monkeypatch) -> None:
    from canet.bench import training

    monkeypatch.setattr(training, "gemm_flops_per_second", lambda *a, **k: 1e10)
    report = training.measure_training(threads=1, num_users=300, num_items=40, steps=2,
                                       old_steps=1)
    runs = {(r["model"], r["path"]): r for r in report["runs"]}
    assert set(runs) == {("canet", "new"), ("canet", "old"), ("full", "new"), ("full", "old")}
    per_target = report["per_target_flops"]
    largest = RoutingSpace().configs[-1]
    assert per_target == 3 * canet.flops(largest, 1, report["settings"]["items"])
    for run in runs.values():
        assert run["steps"] == (2 if run["path"] == "new" else 1)
        assert run["flop_fraction"] == pytest.approx(run["targets_per_second"] * per_target / 1e10)
        assert run["epoch_seconds"] == pytest.approx(
            run["seconds"] / run["steps"] * report["settings"]["epoch_batches"]
        )
    # Old and new steps train on the same real targets: the new one only skips padding.
    assert {t["name"] for t in report["targets"]} == {
        "full-size epoch: fraction of the FLOP limit", "CANet epoch / full-size epoch"
    }
    assert "| canet | new |" in training.training_markdown(report, {"cpu_model": "x"})


def test_canet_bench_train_writes_json_and_markdown(tmp_path, monkeypatch) -> None:
    from canet.bench import training

    monkeypatch.setattr(training, "gemm_flops_per_second", lambda *a, **k: 1e10)
    out = tmp_path / "train.json"
    assert bench.main(["--train", "--users", "40", "--items", "30", "--steps", "1",
                       "--old-steps", "1", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "training" and len(report["runs"]) == 4
    assert out.with_suffix(".md").read_text().startswith("# Training throughput")


def test_results_go_under_benches_only_in_a_checkout(tmp_path, monkeypatch, capsys) -> None:
    from canet.bench.__main__ import default_out

    monkeypatch.chdir(tmp_path)
    assert default_out("x.json") == Path("canet-bench-results") / "x.json"
    assert "not in a canet checkout" in capsys.readouterr().err
    (tmp_path / "benches").mkdir()
    (tmp_path / "canet").mkdir()
    assert default_out("x.json") == Path("benches/results") / "x.json"
    assert not (tmp_path / "benches" / "results").exists()  # nothing made before a write


# -- N processes vs one (canet bench --train --nproc N) ---------------------------------------


def test_canet_bench_train_nproc_times_one_and_two_processes_alike(tmp_path) -> None:
    """Two ranks at one thread each run the same global batches as one process: the same
    steps and targets, both timed; the report and its table come out as JSON + Markdown."""
    out = tmp_path / "nproc.json"
    assert bench.main(["--train", "--nproc", "2", "--threads", "1", "--users", "40",
                       "--items", "30", "--steps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "training-nproc" and report["settings"]["backend"] == "gloo"
    runs = {(r["model"], r["nproc"]): r for r in report["runs"]}
    assert set(runs) == {("canet", 1), ("canet", 2), ("full", 1), ("full", 2)}
    for model in ("canet", "full"):
        one, two = runs[model, 1], runs[model, 2]
        assert one["threads_per_process"] == two["threads_per_process"] == 1
        assert one["seconds"] > 0 and two["seconds"] > 0 and one["steps"] == two["steps"] == 1
        assert one["targets"] == two["targets"] > 0
        assert two["epoch_ratio_vs_one_process"] == pytest.approx(
            two["epoch_seconds"] / one["epoch_seconds"])
        assert report["summary"][f"{model}_epoch_2proc_vs_1proc"] == (
            two["epoch_ratio_vs_one_process"])
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("# Training throughput, 1 vs 2 process(es)")
    assert "| canet | 2 x 1 | 1 |" in markdown


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2"], "--nproc applies to --train only"),
    (["--train", "--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--train", "--nproc", "2", "--old-steps", "1"], "drop --old-steps"),
])
def test_nproc_usage_errors(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_request:
        bench.main(argv)
    assert exit_request.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("canet bench: error: ") and message in error


def _job(**changes):
    job = {"configs": {"full": {"fixed_config": "largest", "progress": False, "threads": 1}},
           "users": 40, "items": 30, "seed": 0, "steps": 1, "device": "cpu", "threads": 1,
           "timeout_s": 60}
    return {**job, **changes}


def test_a_failing_rank_is_reported_not_waited_for() -> None:
    from canet.bench import training
    from canet.distributed import DistributedError

    job = _job(configs={"full": {"no_such_key": 1}})  # every rank fails once its group is up
    with pytest.raises(DistributedError, match=r"rank [01] of the 2-process training run failed "
                                               r"\(exit status 1\): .*unknown config key"):
        training._run_ranks(2, job, timeout_s=60)


def test_ranks_that_outlive_the_timeout_are_stopped(monkeypatch) -> None:
    from canet.bench import training
    from canet.distributed import DistributedError

    started = []
    real_popen = training.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(training.subprocess, "Popen", popen)
    with pytest.raises(DistributedError, match="did not finish within 1 s"):
        training._run_ranks(2, _job(), timeout_s=1)  # not even torch imports in a second
    assert len(started) == 2 and all(p.returncode is not None for p in started)


# -- canet bench --serve -------------------------------------------------------------------
def test_route_like_steers_the_router_to_a_mix() -> None:
    model = bench.build_model(num_items=200, seq_len=12)
    want = bench.paper_weights(model.space, 12, 200)
    bench.route_like(model, want, users=2048)
    held_out = bench.make_sequences(2048, 200, 12, seed=99)
    with torch.inference_mode():
        routed = torch.bincount(model.router(held_out).argmax(1), minlength=len(want)).double()
    routed = routed / routed.sum()
    fractions = bench.config_fractions(model.space, 12, 200)
    # Fresh users: the mix's cost and shape, not just the fitted users'.
    assert abs(float(routed @ fractions) - float(want @ fractions)) < 0.03
    assert float((routed - want).abs().sum()) < 0.25


def test_canet_bench_serve_drives_every_case(tmp_path) -> None:
    pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'canet[serve]'")
    from canet.bench import serving

    out = tmp_path / "serve.json"
    assert bench.main(["--serve", "--items", "40", "--seq-len", "6", "--clients", "5",
                       "--requests", "23", "--threads", "1", "--max-wait-ms", "2",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "serving"
    cases = report["cases"]
    assert list(cases) == list(serving.SERVE_CASES)
    for row in cases.values():
        # Every measured request answered (closed loop: never more than asked).
        assert (row["requests"], row["errors"]) == (23, 0)
        assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert cases["unbatched"]["mean_batch"] == 1.0
    assert cases["largest"]["flops_fraction"] == pytest.approx(1.0)
    assert 0 < cases["batched"]["flops_fraction"] < 1
    assert set(report["targets"]) == set(serving.SERVE_TARGETS)
    assert out.with_suffix(".md").read_text().startswith("# canet serve load test")


def test_canet_bench_serve_flags_are_checked(capsys) -> None:
    for argv, message in (
        (["--clients", "3"], "--clients apply to --serve only"),
        (["--serve", "--train"], "--serve and --train are separate benchmarks"),
        (["--serve", "--batch", "1"], "--batch do not apply to --serve"),
        (["--serve", "--clients", "0"], "--clients, --requests, --max-batch-size and --rounds"),
        (["--serve", "--requests", "2"], "--requests (2) must be at least --rounds (3)"),
    ):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err


def test_the_serve_load_client_counts_error_answers(tmp_path) -> None:
    """A request the server refuses (422) is counted as an error with its example kept, and
    the latencies hold only answered requests; the phase sends exactly the requests asked."""
    pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'canet[serve]'")
    from canet.bench import serving

    spec = serving.server_spec("unbatched", num_items=30, seq_len=4, seed=1, threads=1,
                               backend="torch", max_wait_ms=0.0, max_queue=8)
    server = serving.start_server(spec, tmp_path / "server.log")
    try:
        bodies = serving.request_bodies(8, 30, 4, seed=1)
        bodies.append(b'{"histories": [["1"]], "k": 0}')  # 422: k out of range
        load, _ = serving.drive(server.port, bodies, clients=3, requests=27, warmup=0,
                                timeout_s=60)
    finally:
        server.stop()
    refused = [e for e in load.errors if e]
    assert len(load.latencies) + len(load.errors) == 27
    assert any(e.startswith("HTTP 422") for e in refused)


# -- canet bench --baselines ort -------------------------------------------------------------
def test_bracket_interpolates_between_the_nearest_configs_in_flops() -> None:
    from canet.bench.onnx_baseline import bracket

    fractions = [0.1, 0.5, 0.3, 1.0, 0.3]
    assert bracket(fractions, 0.4) == (2, 1, pytest.approx(0.5))  # ids 2 and 4 tie: 2
    lower, upper, weight = bracket(fractions, 0.3)
    assert fractions[lower] == fractions[upper] == 0.3 and weight == 0.0
    assert bracket(fractions, 0.05) == (0, 0, 0.0)  # below the range: the smallest
    assert bracket(fractions, 1.0) == (3, 3, 0.0)
    lower, upper, weight = bracket(fractions, 0.75)
    assert (lower, upper) == (1, 3)
    assert (1 - weight) * fractions[lower] + weight * fractions[upper] == pytest.approx(0.75)


def test_canet_bench_ort_baseline_times_the_equal_flops_sub_network(tmp_path) -> None:
    from canet.bench.onnx_baseline import unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    out = tmp_path / "ort.json"
    assert bench.main(["--quick", "--batch", "3", "--mix", "paper", "--backends", "torch",
                       "--baselines", "ort", "--items", "40", "--seq-len", "6", "--threads",
                       "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (case,) = report["results"]
    ort = case["ort"]
    fractions = bench.config_fractions(RoutingSpace(), 6, 40).tolist()
    lower, upper, weight = ort["lower"], ort["upper"], ort["upper_weight"]
    assert (1 - weight) * fractions[lower] + weight * fractions[upper] == pytest.approx(
        case["flops_fraction"])
    assert ort["max_rel_error"] < 1e-4  # ONNX Runtime computes the sub-network's scores
    assert ort["equal_flops_s"] == pytest.approx(
        (1 - weight) * ort["lower_s"] + weight * ort["upper_s"])
    entry = case["backends"]["torch"]
    # The engine's time for this ratio is from the rounds interleaved with ONNX Runtime's.
    assert entry["speedup_vs_ort_equal_flops"] == pytest.approx(
        ort["equal_flops_s"] / ort["routed_s"]["torch"])
    assert report["settings"]["baselines_run"] == ["ort"]
    assert "ort= u/s" in out.with_suffix(".md").read_text()


def test_time_interleaved_pools_every_round() -> None:
    calls = {"a": [], "b": []}
    order = []

    def make(name):
        def call():
            calls[name].append(1)
            order.append(name)
        return call

    timings = bench.time_interleaved({"a": make("a"), "b": make("b")}, min_time=0.0, rounds=3,
                                     warmup_time=0.0)
    assert {name: len(t.times) for name, t in timings.items()} == {"a": 3, "b": 3}
    # per round and callable: one untimed call (the other ran in between), one timed call
    assert "".join(order) == "aabb" * 3
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.time_interleaved({"a": make("a")}, rounds=0)


def test_ort_targets_say_how_to_measure_them() -> None:
    verdicts = bench.evaluate_targets([{"mix": "paper", "batch": 1,
                                        "backends": {"cpu": {"efficiency": 1.0}}}])
    (ort,) = [v for v in verdicts if v["target"] == "cpu-vs-ort-B1"]
    assert ort["status"] == "not measured"
    assert ort["reason"] == "the ort baseline was not run (--baselines ort)"
