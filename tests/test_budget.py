"""Serve-time compute budgets (canet.budget) and the penalty through the model, every backend,
the Triton interpreter and evaluate().

References are independent of canet.budget: FLOPs from canet.flops per config, routing by a
float64 brute force over the allowed configs, NDCG ranks recomputed from ``model.score``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import MAX_LEN, NUM_ITEMS, batch, check_against_reference, make_model

from canet import Engine, RoutingSpace, backends
from canet.budget import (
    BudgetError,
    BudgetPoint,
    BudgetTable,
    RoutingPenalty,
    calibrate_lambda,
    check_budget,
    flops_fractions,
    route_with_penalty,
)
from canet.config import config_from_dict
from canet.data import build_dataset, synthetic_log
from canet.errors import CanetError
from canet.evaluate import evaluate
from canet.flops import flops
from canet.train import build_model

AVAILABLE = [name for name, why in backends.availability("cpu").items() if why is None]

# 12 configs whose costs are not in config-id order (hidden-major enumeration).
SPACE = RoutingSpace(depths=(1, 2, 3), hidden=(8, 16), emb=(8, 16), heads=2)


def fractions_of(space, max_len, num_items):
    """The independent reference: canet.flops per config over the most expensive one."""
    costs = [flops(c, max_len, num_items) for c in space.configs]
    return [c / max(costs) for c in costs]


FRACTIONS = fractions_of(SPACE, MAX_LEN, NUM_ITEMS)


def brute_force(logits, fractions, lam, cap=None):
    """Per user, the argmax over configs at or under ``cap`` of ``logit - lam * fraction`` in
    float64 (Python floats); an exact tie goes to the smaller id, as torch.argmax documents
    (calibrated lambdas sit on such ties: the bisection converges to a crossover)."""
    ids = []
    for row in logits.double().tolist():
        allowed = [(x - lam * f, c) for c, (x, f) in enumerate(zip(row, fractions, strict=True))
                   if cap is None or f <= cap]
        best = max(value for value, _ in allowed)
        ids.append(min(c for value, c in allowed if value == best))
    return ids


def cost_at(logits, fractions, lam, cap=None):
    """Mean fraction of the brute-force routing at ``lam``."""
    ids = brute_force(logits, fractions, lam, cap)
    return sum(fractions[i] for i in ids) / len(ids)


def routing_interval(logits, fractions, lam, cap=None):
    """The open range ``(below, above)`` of penalties around ``lam`` that route every user as
    ``lam`` does, from the brute-force ties: a user on config c changes at the nearest
    ``(l_c - l_j) / (f_c - f_j)`` of an allowed j, above ``lam`` toward a cheaper j, below it
    toward a dearer one. ``below`` is 0 and ``above`` inf where no user changes."""
    ids = brute_force(logits, fractions, lam, cap)
    below, above = 0.0, math.inf
    for row, c in zip(logits.double().tolist(), ids, strict=True):
        for j, (x, f) in enumerate(zip(row, fractions, strict=True)):
            if j == c or f == fractions[c] or (cap is not None and f > cap):
                continue
            tie = (row[c] - x) / (fractions[c] - f)
            if f < fractions[c] and tie > lam:
                above = min(above, tie)
            elif f > fractions[c] and 0 <= tie < lam:
                below = max(below, tie)
    return below, above


def assert_calibrated(logits, fractions, budget, lam, achieved, cap=None):
    """``lam`` (from calibrate_lambda) keeps ``budget``, routes as the smallest penalty that
    fits it, and sits in the middle of its routing's range: no user is near a tie."""
    assert achieved <= budget
    assert achieved == pytest.approx(cost_at(logits, fractions, lam, cap), abs=1e-12)
    below, above = routing_interval(logits, fractions, lam, cap)
    if lam == 0.0:
        return
    assert below < lam < above
    if math.isfinite(above):
        assert lam == pytest.approx((below + above) / 2, rel=1e-9)
    # Minimal: every smaller penalty that routes differently no longer fits the budget.
    assert below > 0, "a penalty was used where the router's own routing was in range"
    assert cost_at(logits, fractions, below * (1 - 1e-9), cap) > budget


def one_line_budget_error(excinfo, *needles):
    error = excinfo.value
    assert isinstance(error, BudgetError)
    assert isinstance(error, CanetError) and isinstance(error, ValueError)
    message = str(error)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# -- flops_fractions ---------------------------------------------------------------------------

@pytest.mark.parametrize("space, max_len, num_items", [
    (SPACE, MAX_LEN, NUM_ITEMS),
    (RoutingSpace(), 1, 7),
    (RoutingSpace(depths=(1, 3), hidden=(8, 24), emb=(4, 12), heads=4), 13, 1),
    (RoutingSpace(depths=(2,), hidden=(6,), emb=(5,), heads=3), 3, 2),  # one config
])
def test_flops_fractions_are_flops_over_the_largest(space, max_len, num_items):
    got = flops_fractions(space, max_len, num_items)
    assert isinstance(got, tuple) and len(got) == len(space)
    assert list(got) == pytest.approx(fractions_of(space, max_len, num_items), rel=1e-14)
    assert got[-1] == 1.0
    assert all(0.0 < f <= 1.0 for f in got)


def test_model_fractions_are_its_spaces():
    model = make_model(space=SPACE)
    assert list(model.flops_fractions) == pytest.approx(FRACTIONS, rel=1e-14)


# -- check_budget ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, want", [
    (0.3, 0.3), (1, 1.0), (1.0, 1.0), (1e-9, 1e-9), ("0.25", 0.25), (" 1 ", 1.0), ("1e-1", 0.1),
    (np.float32(0.5), 0.5), (np.float64(0.125), 0.125),
])
def test_check_budget_accepts_numbers_in_zero_one(value, want):
    got = check_budget(value)
    assert isinstance(got, float) and got == want


@pytest.mark.parametrize("value", [
    0, 0.0, -0.1, 1.0000001, 2, float("nan"), float("inf"), float("-inf"), "abc", "", "nan",
    "inf", "1.5", "0.3x", None, True, False, [0.3], "2\n3", "5\n",
    pytest.param(10**400, id="10**400"),
])
def test_check_budget_refuses(value):
    with pytest.raises(BudgetError) as excinfo:
        check_budget(value, "max_flops")
    one_line_budget_error(excinfo, "max_flops", "(0, 1]")


# -- RoutingPenalty ----------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [-1.0, -1e-12, float("nan"), float("inf"), "1", None, True])
def test_penalty_refuses_bad_lambda(lam):
    with pytest.raises(BudgetError) as excinfo:
        RoutingPenalty(lam)
    one_line_budget_error(excinfo, "lambda")


@pytest.mark.parametrize("cap", [0, -0.5, 1.5, float("nan"), "abc"])
def test_penalty_refuses_bad_cap(cap):
    with pytest.raises(BudgetError) as excinfo:
        RoutingPenalty(1.0, cap)
    one_line_budget_error(excinfo, "max_flops")


def test_penalty_normalises_its_numbers():
    """A cap given as a numeric string (a CLI value) works like the number."""
    penalty = RoutingPenalty(2, "0.5")
    assert penalty == RoutingPenalty(2.0, 0.5)
    assert isinstance(penalty.lam, float) and isinstance(penalty.max_flops, float)
    assert torch.equal(penalty.vector(FRACTIONS), RoutingPenalty(2.0, 0.5).vector(FRACTIONS))


def test_identity_penalty_has_no_vector():
    assert RoutingPenalty().is_identity and RoutingPenalty(0.0, None).vector(FRACTIONS) is None
    assert not RoutingPenalty(1e-9).is_identity
    assert not RoutingPenalty(0.0, 1.0).is_identity  # a cap, though it allows every config


@pytest.mark.parametrize("lam", [0.0, 0.37, 5.0, 1e4])
@pytest.mark.parametrize("cap", [None, 1.0, FRACTIONS[5], 0.3, min(FRACTIONS)])
def test_penalty_vector(lam, cap):
    if lam == 0.0 and cap is None:
        return  # the identity: test_identity_penalty_has_no_vector
    got = RoutingPenalty(lam, cap).vector(FRACTIONS)
    assert got.dtype == torch.float64 and got.shape == (len(FRACTIONS),)
    for c, f in enumerate(FRACTIONS):
        if cap is not None and f > cap:
            assert got[c].item() == math.inf
        else:  # a cap equal to a config's fraction allows it
            assert got[c].item() == lam * f


def test_cap_below_every_config_names_the_smallest():
    smallest = min(FRACTIONS)
    for cap in (smallest * 0.999, 1e-6):
        with pytest.raises(BudgetError) as excinfo:
            RoutingPenalty(3.0, cap).vector(FRACTIONS)
        one_line_budget_error(excinfo, f"{smallest:.4f}")


# -- route_with_penalty ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 37])
@pytest.mark.parametrize("fractions", ["space", "random"])
@pytest.mark.parametrize("cap", [None, 0.3, 1.0])
def test_route_with_penalty_against_brute_force(size, fractions, cap):
    g = torch.Generator().manual_seed(size * 7 + (cap is None))
    if fractions == "space":
        costs = FRACTIONS
    else:  # unordered, the largest somewhere in the middle
        costs = torch.rand(9, generator=g, dtype=torch.float64).clamp_min(0.01).tolist()
        costs[4] = 1.0
    for lam in (0.0, 0.1, 1.0, 7.5, 60.0, 1e3):
        for draw in range(3):
            logits = torch.randn(size, len(costs), generator=g) * 3
            logits = logits.double() if draw == 2 else logits  # float64 logits too
            penalty = RoutingPenalty(lam, cap)
            got = route_with_penalty(logits, penalty.vector(costs))
            assert got.dtype == torch.int64 and got.shape == (size,)
            assert got.tolist() == brute_force(logits, costs, lam, cap), (lam, cap)


# -- calibrate_lambda --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration_logits():
    """Router-like logits of 53 users: a few configs preferred, spread over the costs."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(53, len(FRACTIONS), generator=g) * 2 + torch.randn(
        len(FRACTIONS), generator=g
    )


def own_fraction(logits, fractions, cap=None):
    """Mean fraction of the router's own routing (cap: the allowed argmax), by brute force."""
    return cost_at(logits, fractions, 0.0, cap)


def test_calibration_keeps_budgets_is_monotone_minimal_and_away_from_ties(calibration_logits):
    logits = calibration_logits
    own = own_fraction(logits, FRACTIONS)
    smallest = min(FRACTIONS)
    assert own > 2 * smallest  # leaves room for budgets that need a penalty
    g = torch.Generator().manual_seed(11)
    draws = torch.rand(40, generator=g, dtype=torch.float64).tolist()
    budgets = sorted([smallest + (own - smallest) * u for u in draws] + [smallest, own - 1e-9])
    results = [calibrate_lambda(logits, FRACTIONS, b) for b in budgets]
    for budget, (lam, achieved) in zip(budgets, results, strict=True):
        assert_calibrated(logits, FRACTIONS, budget, lam, achieved)
    lams = [lam for lam, _ in results]
    achieved = [a for _, a in results]
    assert all(a >= b for a, b in zip(lams, lams[1:], strict=False))  # larger budget: smaller lam
    assert all(a <= b for a, b in zip(achieved, achieved[1:], strict=False))
    assert lams[-1] > 0 and len(set(lams)) > 5
    assert calibrate_lambda(logits, FRACTIONS, budgets[5]) == results[5]  # deterministic


def test_calibrated_budget_survives_logits_off_by_rounding(calibration_logits):
    """Reviewer's case: at the bisection's own penalty one user sits on a tie, so router logits
    one ulp away (another backend, another batch) moved it back over the budget."""
    logits = calibration_logits
    own = own_fraction(logits, FRACTIONS)
    for budget in (0.15, 0.2, (own + min(FRACTIONS)) / 2):
        lam, _ = calibrate_lambda(logits, FRACTIONS, budget)
        want = brute_force(logits, FRACTIONS, lam)
        for sign in (1, -1):
            nudged = logits.double() * (1 + sign * 1e-7)  # ~ a float32 ulp of every logit
            assert brute_force(nudged, FRACTIONS, lam) == want


def test_calibration_of_a_budget_the_router_fits_is_lambda_zero(calibration_logits):
    own = own_fraction(calibration_logits, FRACTIONS)
    for budget in (own, (own + 1) / 2, 1.0):
        lam, achieved = calibrate_lambda(calibration_logits, FRACTIONS, budget)
        assert lam == 0.0 and achieved == pytest.approx(own, abs=1e-12)


def test_calibration_of_one_user():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    fractions = [0.2, 1.0, 0.5]
    lam, achieved = calibrate_lambda(logits, fractions, 0.6)
    # config 1 -> 2 at 2 - lam = 1 - 0.5 lam (lam = 2), 2 -> 0 at 1 - 0.5 lam = -0.2 lam
    # (lam = 10/3): config 2's range is (2, 10/3), and its middle is taken
    assert achieved == 0.5 and lam == pytest.approx(8 / 3, rel=1e-9)
    lam, achieved = calibrate_lambda(logits, fractions, 0.2)
    assert achieved == 0.2 and lam == pytest.approx(20 / 3, rel=1e-9)  # no further move: 2x


def test_calibration_below_the_smallest_is_refused_naming_it(calibration_logits):
    smallest = min(FRACTIONS)
    with pytest.raises(BudgetError) as excinfo:
        calibrate_lambda(calibration_logits, FRACTIONS, smallest * 0.99)
    one_line_budget_error(excinfo, f"{smallest:.4f}")
    for bad in (0.0, 1.5, float("nan"), "abc"):
        with pytest.raises(BudgetError):
            calibrate_lambda(calibration_logits, FRACTIONS, bad)


@pytest.mark.parametrize("shape", [(0, 12), (5, 11), (5, 13), (12,)])
def test_calibration_refuses_logits_of_another_shape(shape):
    with pytest.raises(BudgetError) as excinfo:
        calibrate_lambda(torch.zeros(shape), FRACTIONS, 0.5)
    one_line_budget_error(excinfo, "12")


@pytest.mark.parametrize("cap", [0.3, FRACTIONS[6]])
def test_calibration_with_a_cap(calibration_logits, cap):
    logits = calibration_logits
    own = own_fraction(logits, FRACTIONS, cap)
    assert own < own_fraction(logits, FRACTIONS)  # the cap alone moves users
    lam, achieved = calibrate_lambda(logits, FRACTIONS, own, cap)
    assert lam == 0.0 and achieved == pytest.approx(own, abs=1e-12)
    budgets = [own * s + min(FRACTIONS) * (1 - s) for s in (0.9, 0.5, 0.2, 0.0)]
    previous = 0.0
    for budget in budgets:  # decreasing budgets: growing lambdas
        lam, achieved = calibrate_lambda(logits, FRACTIONS, budget, cap)
        assert achieved <= budget and lam >= previous
        vector = RoutingPenalty(lam, cap).vector(FRACTIONS)
        ids = route_with_penalty(logits, vector)
        assert max(FRACTIONS[i] for i in ids.tolist()) <= cap
        assert_calibrated(logits, FRACTIONS, budget, lam, achieved, cap)
        previous = lam


# -- BudgetTable -------------------------------------------------------------------------------

def small_table():
    return BudgetTable(
        points=(
            BudgetPoint(0.2, 6.0, 0.19, 0.11),
            BudgetPoint(0.45, 1.5, 0.44, 0.2),
            BudgetPoint(0.7, 0.0, 0.52, None),
        ),
        smallest_fraction=0.099, lam_smallest=64.0, split="valid", num_users=53,
    )


def test_table_identity_and_cap():
    table = small_table()
    assert table.penalty(1.0).is_identity and table.penalty(None).is_identity
    assert table.penalty(None, 0.5) == RoutingPenalty(0.0, 0.5)
    assert table.penalty(1.0, 0.5) == RoutingPenalty(0.0, 0.5)
    assert table.penalty(0.45, 0.5) == RoutingPenalty(1.5, 0.5)


def test_table_between_points_takes_the_largest_routing_that_fits():
    table = small_table()  # achieved 0.19, 0.44, 0.52 at budgets 0.2, 0.45, 0.7
    for point in table.points:
        assert table.penalty(point.budget).lam == point.lam
    assert table.penalty(0.099).lam == 64.0  # nothing calibrated fits: all on the cheapest
    assert table.penalty(0.15).lam == 64.0
    assert table.penalty(0.19).lam == 6.0 and table.penalty(0.3).lam == 6.0
    assert table.penalty(0.44).lam == 1.5 and table.penalty(0.5).lam == 1.5
    assert table.penalty(0.52).lam == 0.0  # the 0.7 point's routing (the router's) fits
    assert table.penalty(0.9).lam == 0.0
    grid = [0.099 + i * (1 - 0.099) / 97 for i in range(98)]
    lams = [table.penalty(b).lam for b in grid]
    assert all(a >= b for a, b in zip(lams, lams[1:], strict=False))


def test_calibrated_table_keeps_budgets_between_its_points(calibration_logits):
    """A budget between two calibrated ones keeps the calibration users at or under it: it
    routes as the largest calibrated routing that fits (reviewer's case: interpolated lambdas
    overshot, by 2x where many users sit near one threshold)."""
    logits = calibration_logits
    smallest = min(FRACTIONS)
    budgets = (0.13, 0.2, 0.3, 1.0)
    points = []
    for budget in budgets:
        lam, achieved = calibrate_lambda(logits, FRACTIONS, budget)
        points.append(BudgetPoint(budget, lam, achieved))
    lam_smallest, _ = calibrate_lambda(logits, FRACTIONS, smallest)
    table = BudgetTable(tuple(points), smallest, lam_smallest, num_users=logits.shape[0])
    assert len({p.lam for p in points}) == len(points)  # the test needs distinct points
    grid = [smallest + i * (1 - smallest) / 200 for i in range(201)]
    achieved = []
    for budget in grid:
        penalty = table.penalty(budget)
        achieved.append(cost_at(logits, FRACTIONS, penalty.lam))
        assert achieved[-1] <= budget + 1e-12
        fitting = [p for p in points if p.flops_fraction <= budget]
        assert achieved[-1] == pytest.approx(
            max(p.flops_fraction for p in fitting) if fitting else smallest, abs=1e-12)
    assert all(a <= b for a, b in zip(achieved, achieved[1:], strict=False))


def test_table_refuses_below_its_smallest_fraction_naming_it():
    with pytest.raises(BudgetError) as excinfo:
        small_table().penalty(0.05)
    one_line_budget_error(excinfo, "0.0990")
    for bad in (0, 1.2, float("nan"), "x"):
        with pytest.raises(BudgetError):
            small_table().penalty(bad)


def test_table_json_round_trip():
    table = small_table()
    again = BudgetTable.from_json(table.to_json(), "run/calibration.json")
    assert again == table
    assert again.to_json() == table.to_json()
    assert json.loads(table.to_json())["version"] == 1


def corrupt(change):
    data = json.loads(small_table().to_json())
    change(data)
    return json.dumps(data)


CORRUPTIONS = {
    "not json": lambda: "{",
    "not an object": lambda: "[]",
    "no version": lambda: corrupt(lambda d: d.pop("version")),
    "version 2": lambda: corrupt(lambda d: d.update(version=2)),
    "version string": lambda: corrupt(lambda d: d.update(version="1")),
    "no points": lambda: corrupt(lambda d: d.pop("points")),
    "empty points": lambda: corrupt(lambda d: d.update(points=[])),
    "points not a list": lambda: corrupt(lambda d: d.update(points=3)),
    "no smallest_fraction": lambda: corrupt(lambda d: d.pop("smallest_fraction")),
    "no lam_smallest": lambda: corrupt(lambda d: d.pop("lam_smallest")),
    "no split": lambda: corrupt(lambda d: d.pop("split")),
    "split not a string": lambda: corrupt(lambda d: d.update(split=None)),
    "no num_users": lambda: corrupt(lambda d: d.pop("num_users")),
    "num_users negative": lambda: corrupt(lambda d: d.update(num_users=-3)),
    "num_users fractional": lambda: corrupt(lambda d: d.update(num_users=2.5)),
    "point without lam": lambda: corrupt(lambda d: d["points"][1].pop("lam")),
    "point with extra key": lambda: corrupt(lambda d: d["points"][0].update(x=1)),
    "point not an object": lambda: corrupt(lambda d: d["points"].append(0.5)),
    "nan lam": lambda: corrupt(lambda d: d["points"][1].update(lam=math.nan)),
    "inf lam_smallest": lambda: corrupt(lambda d: d.update(lam_smallest=math.inf)),
    "nan budget": lambda: corrupt(lambda d: d["points"][1].update(budget=math.nan)),
    "nan ndcg": lambda: corrupt(lambda d: d["points"][0].update(ndcg10=math.nan)),
    "negative lam": lambda: corrupt(lambda d: d["points"][2].update(lam=-1.0)),
    "string lam": lambda: corrupt(lambda d: d["points"][2].update(lam="1")),
    "budget above 1": lambda: corrupt(lambda d: d["points"][2].update(budget=1.5)),
    "increasing lambdas": lambda: corrupt(lambda d: d["points"][2].update(lam=2.0)),
    "lam_smallest below a point's": lambda: corrupt(lambda d: d.update(lam_smallest=5.0)),
    "duplicate budgets": lambda: corrupt(lambda d: d["points"][1].update(budget=0.2)),
    "decreasing budgets": lambda: corrupt(lambda d: d["points"].reverse()),
    "smallest_fraction 0": lambda: corrupt(lambda d: d.update(smallest_fraction=0)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_table_from_json_refuses_corrupted_tables(case):
    with pytest.raises(BudgetError) as excinfo:
        BudgetTable.from_json(CORRUPTIONS[case](), "runs/x/calibration.json")
    one_line_budget_error(excinfo, "runs/x/calibration.json")


# -- the model and every backend ---------------------------------------------------------------

def penalties(fractions=FRACTIONS):
    """Penalties that move routing (lambdas on the logits' scale) and caps between costs (one
    equal to a config's cost)."""
    ordered = sorted(fractions)
    cap = (ordered[5] + ordered[6]) / 2
    return [
        RoutingPenalty(0.5), RoutingPenalty(4.0), RoutingPenalty(40.0), RoutingPenalty(5e3),
        RoutingPenalty(0.0, cap), RoutingPenalty(2.0, cap), RoutingPenalty(0.0, ordered[3]),
    ]


def plan_fraction(ids, space, max_len, num_items):
    """Mean FLOPs fraction of the routed ids, from canet.flops."""
    largest = max(flops(c, max_len, num_items) for c in space.configs)
    return sum(flops(space.configs[i], max_len, num_items) for i in ids.tolist()) / (
        ids.numel() * largest
    )


def test_model_route_is_the_brute_force_argmax():
    model = make_model(space=SPACE, seed=4)
    seqs = batch(37, seed=8)
    with torch.no_grad():
        logits = model.router.logits_unchecked(seqs)
    moved = 0
    for penalty in penalties():
        got = model.route(seqs, penalty)
        want = brute_force(logits, FRACTIONS, penalty.lam, penalty.max_flops)
        assert got.tolist() == want
        moved += int(not torch.equal(got, model.route(seqs)))
    assert moved >= len(penalties()) - 1
    assert torch.equal(model.route(seqs, RoutingPenalty()), model.route(seqs))


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("size", [1, 37])
def test_engine_routes_and_scores_as_the_model(backend, size):
    model = make_model(space=SPACE, seed=size)
    seqs = batch(size, seed=size + 2)
    for penalty in penalties():
        engine = Engine(model, backend=backend, penalty=penalty)
        want = model.route(seqs, penalty)
        assert torch.equal(engine.route(seqs), want), penalty
        got = engine.score(seqs)
        assert torch.equal(engine.last_config_ids, want)
        expected = model.score(seqs, penalty=penalty)
        err = ((got[:, 1:] - expected[:, 1:]).abs().max() / expected[:, 1:].abs().max()).item()
        assert err < 1e-10 and torch.isneginf(got[:, 0]).all()
        assert engine.last_plan.flops_fraction == pytest.approx(
            plan_fraction(want, SPACE, MAX_LEN, NUM_ITEMS), rel=1e-12
        )
        if penalty.max_flops is not None:
            assert max(FRACTIONS[i] for i in want.tolist()) <= penalty.max_flops


@pytest.mark.parametrize("backend", AVAILABLE)
def test_engine_float32_scores_within_the_rounding_rule(backend):
    model = make_model(torch.float32, space=SPACE, seed=2)
    seqs = batch(23, seed=3)
    for penalty in penalties()[1::2]:
        engine = Engine(model, backend=backend, penalty=penalty)
        got = engine.score(seqs)
        ids = model.route(seqs, penalty)
        assert torch.equal(engine.last_config_ids, ids)
        check_against_reference(got, model, seqs, ids)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_budget_one_and_no_budget_are_the_router_exactly(backend):
    model = make_model(space=SPACE, seed=5)
    seqs = batch(37, seed=9)
    want = model.route(seqs)
    model.budget_table = small_table()
    for engine in (
        Engine(model, backend=backend), Engine(model, backend=backend, budget=1.0),
        Engine(model, backend=backend, budget="1"),
        Engine(model, backend=backend, penalty=RoutingPenalty()),
        Engine(model, backend=backend, budget=1.0, budget_table=small_table()),
    ):
        assert engine.penalty is None
        assert torch.equal(engine.route(seqs), want)
    model.budget_table = None
    assert Engine(model, backend=backend, budget=1.0).penalty is None


def test_engine_budget_without_a_table_says_to_calibrate():
    model = make_model(space=SPACE)
    with pytest.raises(BudgetError) as excinfo:
        Engine(model, backend="torch", budget=0.3)
    one_line_budget_error(excinfo, "canet calibrate")


SMALLEST = f"{min(FRACTIONS):.4f}"


@pytest.mark.parametrize("kwargs, needle", [
    ({"penalty": RoutingPenalty(1.0), "budget": 0.3}, "not both"),
    ({"penalty": RoutingPenalty(1.0), "max_flops": 0.5}, "not both"),
    ({"penalty": RoutingPenalty(), "budget": 1.0}, "not both"),
    ({"penalty": 0.3}, "RoutingPenalty"),
    ({"penalty": "0.3"}, "RoutingPenalty"),
    ({"budget": 0.0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "abc"}, "budget"),
    ({"budget": float("nan")}, "budget"), ({"budget": 0.05}, "0.0990"),  # the table's
    ({"max_flops": 0.0}, "max_flops"), ({"max_flops": True}, "max_flops"),
    ({"max_flops": 0.05}, SMALLEST),  # a cap below the smallest config
    ({"penalty": RoutingPenalty(1.0, 0.05)}, SMALLEST),
])
def test_engine_refuses_bad_budgets(kwargs, needle):
    model = make_model(space=SPACE)
    model.budget_table = small_table()
    with pytest.raises(BudgetError) as excinfo:
        Engine(model, backend="torch", **kwargs)
    one_line_budget_error(excinfo, needle)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_engine_budget_uses_the_table(backend):
    model = make_model(space=SPACE, seed=6)
    seqs = batch(37, seed=4)
    table = small_table()
    for budget, cap in ((0.3, None), (0.45, None), (0.15, 0.3), (0.9, None)):
        kwargs = {} if cap is None else {"max_flops": cap}
        engine = Engine(model, backend=backend, budget=budget, budget_table=table, **kwargs)
        penalty = table.penalty(budget, cap)
        assert engine.penalty == (None if penalty.is_identity else penalty)
        assert budget < 0.9 or engine.penalty is None  # above the last point: lambda 0
        assert torch.equal(engine.route(seqs), model.route(seqs, table.penalty(budget, cap)))
    model.budget_table = table  # the model's own table is the default
    engine = Engine(model, backend=backend, budget=0.3)
    assert engine.penalty == table.penalty(0.3)
    assert engine.budget == 0.3
    other = BudgetTable((BudgetPoint(0.5, 0.25, 0.4),), 0.099, 300.0)
    assert Engine(model, backend=backend, budget=0.3, budget_table=other).penalty == (
        other.penalty(0.3)
    )


@pytest.mark.parametrize("backend", AVAILABLE)
def test_engine_with_budget_shares_the_backend_and_routes_as_a_new_engine(backend):
    model = make_model(space=SPACE, seed=6)
    seqs = batch(29, seed=5)
    table = small_table()
    base = Engine(model, backend=backend, budget_table=table)
    base.score(seqs)  # warm: the derived engines must not disturb its state
    for budget, cap in ((0.3, None), (0.15, 0.3), (None, 0.5), (None, None)):
        derived = base.with_budget(budget, cap)
        fresh = Engine(model, backend=backend, budget=budget, max_flops=cap, budget_table=table)
        assert derived._impl is base._impl  # one backend: weights, packs, kernels
        assert (derived.budget, derived.penalty) == (fresh.budget, fresh.penalty)
        assert torch.equal(derived.route(seqs), fresh.route(seqs))
        torch.testing.assert_close(derived.score(seqs), fresh.score(seqs), rtol=0, atol=0)
        assert derived.last_plan.histogram == fresh.last_plan.histogram
    assert base.penalty is None and base.budget is None
    with pytest.raises(BudgetError, match="needs a calibration table"):
        Engine(model, backend=backend).with_budget(0.3)


def test_recommender_with_budget_shares_the_engine_backend():
    from canet.data import Vocab
    from canet.recommender import Recommender

    model = make_model(space=SPACE, seed=6)
    vocab = Vocab(["u"], [f"i{n}" for n in range(1, NUM_ITEMS + 1)])
    base = Recommender(model, vocab, backend="torch")
    model.budget_table = small_table()
    try:
        cheap = base.with_budget(0.2)
        histories = [[f"i{n}" for n in range(1 + u, 6 + u)] for u in range(7)]
        want = Recommender(model, vocab, backend="torch", budget=0.2).recommend(histories)
        assert cheap.recommend(histories) == want
        assert cheap.engine._impl is base.engine._impl and base.engine.budget is None
        fixed = Recommender(model, vocab, backend="torch", fixed_config_id=3)
        with pytest.raises(BudgetError):
            fixed.with_budget(0.2)
    finally:
        model.budget_table = None


def test_engine_max_flops_alone_needs_no_table():
    model = make_model(space=SPACE, seed=7)
    seqs = batch(37, seed=5)
    engine = Engine(model, backend="torch", max_flops=0.3)
    assert engine.penalty == RoutingPenalty(0.0, 0.3)
    ids = engine.route(seqs)
    assert max(FRACTIONS[i] for i in ids.tolist()) <= 0.3
    assert torch.equal(ids, model.route(seqs, RoutingPenalty(0.0, 0.3)))


# -- Triton under the interpreter --------------------------------------------------------------

TRITON_LEN = 5


@pytest.fixture
def triton_engine(monkeypatch):
    """A real Engine over the Triton backend on CPU: the backend itself runs under the
    interpreter (TRITON_INTERPRET=1); ``backends.availability`` keeps refusing CPUs, so the
    resolver is told to pick triton."""
    pytest.importorskip("triton")
    monkeypatch.setattr(backends, "resolve", lambda name, device, dtype=None: "triton")

    def make(model, **kwargs):
        engine = Engine(model, backend="triton", **kwargs)
        assert engine.backend == "triton" and engine._impl.PLANS_ON_DEVICE
        return engine

    return make


@pytest.mark.interpreter
def test_budget_triton_routes_and_scores_as_the_model(triton_engine):
    model = make_model(torch.float32, space=SPACE, seed=1, max_len=TRITON_LEN)
    seqs = batch(7, seed=2, max_len=TRITON_LEN)
    for penalty in penalties(model.flops_fractions):
        engine = triton_engine(model, penalty=penalty)
        want = model.route(seqs, penalty)
        assert torch.equal(engine.route(seqs), want), penalty
        assert torch.equal(engine.route(seqs[:1]), want[:1])
    for penalty in penalties(model.flops_fractions)[2::3]:  # the interpreter is slow
        engine = triton_engine(model, penalty=penalty)
        got = engine.score(seqs)
        want = model.route(seqs, penalty)
        assert torch.equal(engine.last_config_ids, want)
        check_against_reference(got, model, seqs, want)
        assert engine.last_plan.flops_fraction == pytest.approx(
            plan_fraction(want, SPACE, TRITON_LEN, NUM_ITEMS), rel=1e-12
        )


@pytest.mark.interpreter
def test_budget_triton_captured_forward_routes_with_the_penalty(monkeypatch):
    """CapturedForward's step with a penalty, graph capture replaced by running the step
    (CUDA graphs need a GPU)."""
    pytest.importorskip("triton")
    from canet.backends import triton_backend

    class Replay:
        def __init__(self, step):
            self.step = step

        def replay(self):
            with torch.inference_mode():
                self.step()

    monkeypatch.setattr(triton_backend.base, "capture_cuda_graph", lambda step, _: Replay(step))
    model = make_model(torch.float32, space=SPACE, seed=3, max_len=TRITON_LEN)
    backend = triton_backend.Backend(model.arch, model.state_dict(), torch.device("cpu"))
    seqs = batch(5, seed=6, max_len=TRITON_LEN)
    penalty = RoutingPenalty(4.0, 0.3)
    captured = triton_backend.CapturedForward(
        backend, 5, routed=True, penalty=penalty.vector(model.flops_fractions)
    )
    got = captured(seqs).clone()
    want = model.route(seqs, penalty)
    assert torch.equal(captured.config_ids, want)
    assert not torch.equal(want, model.route(seqs))  # the penalty moved someone
    check_against_reference(got, model, seqs, want)


# -- evaluate ----------------------------------------------------------------------------------

TINY = {"max_len": 8, "depths": [1, 2], "hidden": [8, 16], "emb": [8, 16], "heads": 2,
        "router_dim": 8, "router_heads": 2}


@pytest.fixture(scope="module")
def trained_like():
    config = config_from_dict(TINY)
    data = build_dataset(synthetic_log(61, 23, 2, seq_len=(5, 19)), config.max_len)
    torch.manual_seed(1)
    # float64: the native router's logits equal PyTorch's to far below any routing margin
    model = build_model(config, data.num_items).double().eval()
    with torch.no_grad():  # spread the routing over several configs
        model.router.head.weight.normal_(0, 2.0)
    seqs = torch.cat([s for _, s, _ in data.eval_batches("valid", 1000)])
    return data, model, seqs


def independent_ranks(model, seqs, targets, ids):
    """0-based target ranks among real items, the input window excluded (a target in it is
    ranked last), ties counted for the target."""
    with torch.no_grad():
        scores = model.score(seqs, ids).double()
    scores[:, 0] = -math.inf
    scores.scatter_(1, seqs, -math.inf)
    target = scores.gather(1, targets[:, None])
    ranks = (scores[:, 1:] > target).sum(dim=1)
    return torch.where(torch.isneginf(target[:, 0]), scores.shape[1] - 1, ranks)


@pytest.mark.parametrize("backend", ["model", *AVAILABLE])
def test_evaluate_histogram_is_the_penalised_routing(trained_like, backend):
    data, model, seqs = trained_like
    fractions = model.flops_fractions
    cap = sorted(fractions)[4]
    for penalty in (RoutingPenalty(0.3), RoutingPenalty(3.0), RoutingPenalty(1.0, cap)):
        result = evaluate(model, data, "valid", backend=backend, penalty=penalty, batch_size=17)
        ids = model.route(seqs, penalty)
        assert result["routing"]["histogram"] == torch.bincount(
            ids, minlength=len(fractions)).tolist()
        assert result["routing"]["penalty"] == {"lam": penalty.lam, "max_flops": penalty.max_flops}
        assert result["flops"]["fraction_of_largest"] == pytest.approx(
            plan_fraction(ids, model.space, model.max_len, model.num_items), rel=1e-12
        )
    assert not torch.equal(model.route(seqs, RoutingPenalty(3.0)), model.route(seqs))


def test_evaluate_without_penalty_is_the_router(trained_like):
    data, model, seqs = trained_like
    targets = torch.cat([t for _, _, t in data.eval_batches("valid", 1000)])
    result = evaluate(model, data, "valid", penalty=None, per_user=True, batch_size=13)
    ids = model.route(seqs)
    assert result["routing"]["mode"] == "router argmax"
    assert result["routing"]["penalty"] is None
    histogram = torch.bincount(ids, minlength=len(model.space)).tolist()
    assert result["routing"]["histogram"] == histogram
    want = independent_ranks(model, seqs, targets, ids)
    assert result["per_user"]["ranks"].tolist() == want.tolist()
    ndcg = sum(1 / math.log2(r + 2) for r in want.tolist() if r < 10) / len(want)
    assert result["metrics"]["ndcg@10"] == pytest.approx(ndcg, abs=1e-12)
    # the identity penalty is no penalty, whichever path scores
    for backend in ("model", *AVAILABLE):
        same = evaluate(model, data, "valid", backend=backend, penalty=RoutingPenalty(),
                        per_user=True, batch_size=13)
        assert same["routing"] == result["routing"]
        assert same["metrics"] == pytest.approx(result["metrics"], abs=1e-12)


def test_evaluate_refuses_a_penalty_with_a_fixed_config_or_an_engine(trained_like):
    data, model, _ = trained_like
    with pytest.raises(CanetError, match="fixed config"):
        evaluate(model, data, "valid", fixed_config_id=2, penalty=RoutingPenalty(1.0))
    with pytest.raises(CanetError, match="Engine"):
        evaluate(model, data, "valid", engine=Engine(model, backend="torch"),
                 penalty=RoutingPenalty(1.0))
    with pytest.raises(CanetError, match="RoutingPenalty"):
        evaluate(model, data, "valid", penalty=0.3)
    with pytest.raises(CanetError, match="fixed config"):  # also the identity: say so
        evaluate(model, data, "valid", fixed_config_id=2, penalty=RoutingPenalty())


def test_evaluate_with_an_engine_reports_its_penalty(trained_like):
    data, model, seqs = trained_like
    penalty = RoutingPenalty(3.0)
    engine = Engine(model, backend="torch", penalty=penalty)
    result = evaluate(model, data, "valid", engine=engine)
    assert result["routing"]["penalty"] == {"lam": 3.0, "max_flops": None}
    assert result["routing"]["histogram"] == torch.bincount(
        model.route(seqs, penalty), minlength=len(model.space)).tolist()
