"""The FLOPs-target term (canet.losses.flops_loss, issue 16): its value against a float64
reference, its cached cost table, and that its gradient moves a toy router toward the target."""

from __future__ import annotations

import math

import pytest
import torch

from canet import RoutingSpace
from canet.budget import flops_fractions
from canet.losses import flops_fraction_table, flops_loss

# Costs of a toy router's 5 configs (config-id order, not sorted: the term must not assume it).
FRACTIONS = [0.5, 0.1, 1.0, 0.25, 0.8]


def _reference(logits: torch.Tensor, fractions: list[float], target: float) -> tuple[float, float]:
    """(penalty, expected) in float64 from plain Python sums."""
    expected = 0.0
    for row in logits.double().tolist():
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        expected += sum(w * f for w, f in zip(weights, fractions, strict=True)) / sum(weights)
    expected /= len(logits)
    return (expected - target) ** 2, expected


@pytest.mark.parametrize(("batch", "seed", "target"), [(1, 0, 0.3), (7, 1, 0.9), (13, 2, 1.0)])
def test_flops_loss_equals_a_float64_reference(batch: int, seed: int, target: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, len(FRACTIONS), generator=g) * 3
    penalty, expected = flops_loss(logits, torch.tensor(FRACTIONS), target)
    want_penalty, want_expected = _reference(logits, FRACTIONS, target)
    assert penalty.dtype == expected.dtype == torch.float32
    assert penalty.shape == expected.shape == ()
    assert expected.item() == pytest.approx(want_expected, rel=1e-6)
    assert penalty.item() == pytest.approx(want_penalty, rel=1e-5, abs=1e-12)
    # bf16 logits (as under autocast) are read in float32: the same values.
    half = logits.bfloat16()
    got = flops_loss(half, torch.tensor(FRACTIONS), target)[1]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference(half.float(), FRACTIONS, target)[1], rel=1e-6)


def test_fraction_table_is_the_budget_cost_built_once() -> None:
    space = RoutingSpace((1, 2), (8, 16), (8, 16), 2)
    table = flops_fraction_table(space, 9, 37, torch.float32, torch.device("cpu"))
    assert table.dtype == torch.float32 and table.shape == (space.n_configs,)
    assert table.tolist() == pytest.approx(flops_fractions(space, 9, 37), rel=1e-7)
    assert float(table[space.largest_id]) == 1.0
    # Cached per key (no host-to-device copy per step), and a plain tensor even when first
    # asked for under inference_mode.
    with torch.inference_mode():
        again = flops_fraction_table(space, 9, 37, torch.float32, torch.device("cpu"))
    assert again is table and not again.is_inference()
    assert flops_fraction_table(space, 9, 38, torch.float32, torch.device("cpu")) is not table


def _toy_router(seed: int, bias: list[float]) -> tuple[torch.Tensor, torch.nn.Linear]:
    """Inputs ``[11, 3]`` and a linear router to 5 logits, its bias set to ``bias``."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(11, 3, generator=g)
    torch.manual_seed(seed)
    router = torch.nn.Linear(3, len(FRACTIONS))
    with torch.no_grad():
        router.bias.copy_(torch.tensor(bias))
    return inputs, router


@pytest.mark.parametrize(
    ("bias", "target"),
    [
        ([0.0, 0.0, 3.0, 0.0, 2.0], 0.3),  # starts expensive (~0.9): pulled down
        ([0.0, 3.0, 0.0, 2.0, 0.0], 0.7),  # starts cheap (~0.2): pulled up
    ],
    ids=["from_above", "from_below"],
)
def test_sgd_on_the_flops_term_moves_the_expected_fraction_to_the_target(
    bias: list[float], target: float
) -> None:
    inputs, router = _toy_router(5, bias)
    fractions = torch.tensor(FRACTIONS)
    optimizer = torch.optim.SGD(router.parameters(), lr=2.0)
    gaps = []
    for _ in range(40):
        penalty, expected = flops_loss(router(inputs), fractions, target)
        gaps.append(abs(expected.item() - target))
        optimizer.zero_grad()
        penalty.backward()
        optimizer.step()
    assert gaps[0] > 0.2, gaps[0]  # a real miss to start from
    assert all(b <= a + 1e-7 for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 0.25 * gaps[0], gaps


def test_the_gradient_is_zero_at_the_target() -> None:
    inputs, router = _toy_router(6, [0.3, -0.2, 0.1, 0.0, 0.5])
    fractions = torch.tensor(FRACTIONS)
    with torch.no_grad():
        reached = flops_loss(router(inputs), fractions, 0.5)[1].item()
    penalty, expected = flops_loss(router(inputs), fractions, reached)
    penalty.backward()
    assert expected.item() == reached and penalty.item() == 0.0
    assert all(bool((p.grad == 0).all()) for p in router.parameters())
    # Just off the target the gradient is not zero (the check above can fail).
    router.zero_grad()
    flops_loss(router(inputs), fractions, reached + 0.05)[0].backward()
    assert router.bias.grad.abs().sum() > 0
