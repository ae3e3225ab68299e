"""The PyTorch CANet against its normative semantics (issue: CANet in PyTorch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_rounding_like_pytorch  # tests/ is on sys.path
from helpers import make_model as random_model
from torch.utils.flop_counter import FlopCounterMode

import canet
from canet import CANet, Config, RoutingSpace
from canet.losses import (
    LossWeights,
    balance_loss,
    decoupled_marginals,
    guide_loss,
    linear_cross_entropy,
    next_item_loss,
    smallest_hits,
    soft_labels,
    uniform_loss,
)
from canet.model import gumbel_straight_through

NUM_ITEMS = 37
MAX_LEN = 9


def make_model(dtype=torch.float64, seed=0, space=None) -> CANet:
    """Fresh random weights, residual scales and LayerNorm affine far from their inits (the
    1e-8 / identity inits would hide bugs)."""
    return random_model(dtype, seed, NUM_ITEMS, MAX_LEN, space)


def padded_batch(batch=7, seed=1, max_len=MAX_LEN) -> torch.Tensor:
    """Left-padded random sequences with heavy padding: lengths 1..L, one row of length 1."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, NUM_ITEMS + 1, (batch, max_len), generator=g)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = 1
    positions = torch.arange(max_len)
    seqs[positions[None, :] < (max_len - lengths)[:, None]] = 0
    return seqs


# -- routing space ----------------------------------------------------------------------------


def test_routing_space_enumeration_is_hidden_major_then_depth_then_emb():
    space = RoutingSpace()
    assert space.n_configs == 36
    assert space.configs[0] == Config(2, 64, 64)
    assert space.configs[-1] == Config(8, 128, 128)
    assert space.configs[1] == Config(2, 64, 96)
    assert space.configs[3] == Config(4, 64, 64)
    assert space.configs[12] == Config(2, 96, 64)
    assert [space.index(c) for c in space.configs] == list(range(36))
    assert space.table()[5].tolist() == [4, 64, 128]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden": (64, 90)}, "divisible by heads"),
        ({"depths": ()}, "must not be empty"),
        ({"emb": (128, 64)}, "strictly increasing"),
        ({"depths": (0, 2)}, "positive"),
        ({"heads": 0}, "heads"),
    ],
)
def test_invalid_routing_space_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RoutingSpace(**kwargs)


def test_state_dict_follows_the_checkpoint_schema():
    space = RoutingSpace(depths=(1, 3), hidden=(8, 16), emb=(4, 12), heads=4)
    model = CANet(NUM_ITEMS, MAX_LEN, space=space)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n, h, e = NUM_ITEMS + 1, 16, 12
    expected = {
        "supernet.item_emb.weight": (n, e),
        "supernet.pos_emb.weight": (MAX_LEN, e),
        "supernet.in_proj.weight": (h, e),
        "supernet.in_proj.bias": (h,),
        "supernet.out.weight": (n, h),
        "supernet.out.bias": (n,),
    }
    for i in range(3):
        p = f"supernet.blocks.{i}."
        expected.update({
            p + "attn.qkv.weight": (3 * h, h), p + "attn.qkv.bias": (3 * h,),
            p + "attn.out.weight": (h, h), p + "attn.out.bias": (h,),
            p + "ln1.weight": (h,), p + "ln1.bias": (h,),
            p + "ffn.fc1.weight": (4 * h, h), p + "ffn.fc1.bias": (4 * h,),
            p + "ffn.fc2.weight": (h, 4 * h), p + "ffn.fc2.bias": (h,),
            p + "ln2.weight": (h,), p + "ln2.bias": (h,),
            p + "res_scale1": (), p + "res_scale2": (),
        })
    supernet = {k: v for k, v in shapes.items() if k.startswith("supernet.")}
    assert supernet == expected
    assert set(shapes) - set(supernet) == {k for k in shapes if k.startswith("router.")}
    assert shapes["router.head.weight"] == (space.n_configs, 32)
    scales = [p.item() for n_, p in model.named_parameters() if "res_scale" in n_]
    assert scales and all(s == pytest.approx(1e-8) for s in scales)


# -- an independent reference, written from the semantics, reading only the state_dict ----------


def _ln(z, w, b):
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) / np.sqrt(var + 1e-5) * w + b


def _gelu(z):
    erf = np.vectorize(math.erf)
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def reference_score(state, seq, config, heads, max_hidden):
    """Scores [N+1] of one user (numpy float64, loops over heads and query positions)."""
    sd = {k: v.detach().double().numpy() for k, v in state.items()}
    d, h, e = config.depth, config.hidden, config.emb
    H = max_hidden
    seq = np.asarray(seq)
    L = len(seq)
    x = (sd["supernet.item_emb.weight"][seq] + sd["supernet.pos_emb.weight"])[:, :e]
    x = x @ sd["supernet.in_proj.weight"][:h, :e].T + sd["supernet.in_proj.bias"][:h]
    head_dim = h // heads
    for i in range(d):
        p = f"supernet.blocks.{i}."
        W, bias = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        q = x @ W[0:h, :h].T + bias[0:h]
        k = x @ W[H : H + h, :h].T + bias[H : H + h]
        v = x @ W[2 * H : 2 * H + h, :h].T + bias[2 * H : 2 * H + h]
        o = np.zeros_like(q)
        for head in range(heads):
            channels = [pos * heads + head for pos in range(head_dim)]
            for t in range(L):
                keys = [j for j in range(t + 1) if seq[j] != 0] or [t]
                logits = np.array([q[t, channels] @ k[j, channels] for j in keys])
                logits /= math.sqrt(head_dim)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                o[t, channels] = sum(wj * v[j, channels] for wj, j in zip(w, keys, strict=True))
        a = o @ sd[p + "attn.out.weight"][:h, :h].T + sd[p + "attn.out.bias"][:h]
        x = _ln(x + sd[p + "res_scale1"] * a, sd[p + "ln1.weight"][:h], sd[p + "ln1.bias"][:h])
        u = _gelu(x @ sd[p + "ffn.fc1.weight"][: 4 * h, :h].T + sd[p + "ffn.fc1.bias"][: 4 * h])
        f = u @ sd[p + "ffn.fc2.weight"][:h, : 4 * h].T + sd[p + "ffn.fc2.bias"][:h]
        x = _ln(x + sd[p + "res_scale2"] * f, sd[p + "ln2.weight"][:h], sd[p + "ln2.bias"][:h])
    scores = x[-1] @ sd["supernet.out.weight"][:, :h].T + sd["supernet.out.bias"]
    scores[0] = -np.inf
    return scores


def test_score_matches_an_independent_reference_for_every_config():
    model = make_model()
    state = model.state_dict()
    seqs = padded_batch(batch=36, seed=3)
    config_ids = torch.randperm(36, generator=torch.Generator().manual_seed(4))
    scores = model.score(seqs, config_ids).detach().numpy()
    for row in range(36):
        config = model.space.configs[int(config_ids[row])]
        ref = reference_score(state, seqs[row].tolist(), config, 4, 128)
        assert ref[0] == -np.inf and scores[row, 0] == -np.inf
        np.testing.assert_allclose(scores[row, 1:], ref[1:], rtol=1e-10, atol=1e-10)


# -- masked path == sliced path ------------------------------------------------------------------


def test_masked_path_equals_sliced_path_for_every_config():
    model = make_model(torch.float64)
    seqs = padded_batch(batch=72, seed=7)
    ids = torch.arange(72) % 36  # every config twice, with different padding
    with torch.no_grad():
        sliced = model.score(seqs, ids)[:, 1:]
        masked = model.score_masked(seqs, model.one_hot(ids))[:, 1:]
    rel = (sliced - masked).abs().amax(-1) / sliced.abs().amax(-1)
    assert rel.max() < 1e-10, f"configs {ids[rel >= 1e-10].tolist()}: relative errors {rel}"


def test_masked_path_rounds_like_the_sliced_path_in_float32():
    # Against a float64 reference, not a fixed tolerance: fp32 rounding through eight random
    # blocks puts the sliced path's own error near 5e-6.
    model = make_model(torch.float32)
    seqs = padded_batch(batch=72, seed=7)
    ids = torch.arange(72) % 36
    with torch.no_grad():
        masked = model.score_masked(seqs, model.one_hot(ids))[:, 1:]
    assert_rounding_like_pytorch(masked, model, lambda m: m.score(seqs, ids)[:, 1:].detach())


def test_masked_path_equals_sliced_path_for_a_mixed_batch_at_every_position():
    model = make_model()
    seqs = padded_batch(batch=11, seed=8)
    ids = torch.randint(0, 36, (11,), generator=torch.Generator().manual_seed(9))
    masked = model.logits_masked(seqs, model.one_hot(ids))
    real = seqs != 0
    for row in range(11):
        sliced = model.logits_sliced(seqs[row : row + 1], model.space.configs[int(ids[row])])[0]
        diff = (sliced - masked[row])[real[row]][:, 1:].abs().max()
        assert diff / sliced[real[row]][:, 1:].abs().max() < 1e-10


# -- depth and slicing really select a sub-network ------------------------------------------------


def used_entries(model: CANet, config: Config) -> dict[str, torch.Tensor]:
    """Per supernet parameter, a bool mask of the entries config reads (from the semantics)."""
    H, h, e, d = model.space.max_hidden, config.hidden, config.emb, config.depth
    used = {}
    for name, p in model.supernet.named_parameters():
        m = torch.zeros_like(p, dtype=torch.bool)
        if name in ("item_emb.weight", "pos_emb.weight"):
            m[:, :e] = True
        elif name == "in_proj.weight":
            m[:h, :e] = True
        elif name == "in_proj.bias":
            m[:h] = True
        elif name == "out.weight":
            m[:, :h] = True
        elif name == "out.bias":
            m[:] = True
        elif int(name.split(".")[1]) < d:
            leaf = name.split(".", 2)[2]
            if leaf == "attn.qkv.weight":
                for r in (0, H, 2 * H):
                    m[r : r + h, :h] = True
            elif leaf == "attn.qkv.bias":
                for r in (0, H, 2 * H):
                    m[r : r + h] = True
            elif leaf == "ffn.fc1.weight":
                m[: 4 * h, :h] = True
            elif leaf == "ffn.fc1.bias":
                m[: 4 * h] = True
            elif leaf == "ffn.fc2.weight":
                m[:h, : 4 * h] = True
            elif m.dim() == 0:
                m.fill_(True)
            elif m.dim() == 2:
                m[:h, :h] = True
            else:
                m[:h] = True
        used[name] = m
    return used


@pytest.mark.parametrize("config_id", [0, 4, 17, 22, 35])
def test_weights_outside_the_config_prefixes_and_deeper_blocks_do_not_matter(config_id):
    model = make_model(seed=config_id)
    seqs = padded_batch(batch=4, seed=config_id)
    ids = torch.full((4,), config_id)
    before = model.score(seqs, ids)
    config = model.space.configs[config_id]
    used = used_entries(model, config)
    with torch.no_grad():
        for name, p in model.supernet.named_parameters():
            p[~used[name]] = torch.randn_like(p)[~used[name]] * 10
    assert torch.equal(model.score(seqs, ids), before)
    # ... while a used entry does matter (the test can fail).
    with torch.no_grad():
        model.supernet.blocks[config.depth - 1].ffn.fc2.weight[config.hidden - 1, 0] += 1.0
    assert not torch.equal(model.score(seqs, ids), before)


# -- routing, gradients, no NaN ------------------------------------------------------------------


def test_route_is_deterministic_argmax_of_router_logits():
    model = make_model()
    seqs = padded_batch(batch=6, seed=2)
    logits = model.router(seqs)
    assert logits.shape == (6, 36)
    assert torch.equal(model.route(seqs), logits.argmax(-1))
    assert torch.equal(model.score(seqs), model.score(seqs, model.route(seqs)))


def test_gumbel_straight_through_is_one_hot_forward_and_soft_backward():
    logits = torch.randn(5, 36, dtype=torch.float64, requires_grad=True)
    choice = gumbel_straight_through(logits, tau=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(choice.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(choice.max(-1).values, torch.ones(5, dtype=torch.float64))
    (choice * torch.randn(5, 36, dtype=torch.float64)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_masked_training_step_gives_finite_nonzero_gradients_to_router_and_shared_weights():
    torch.manual_seed(0)
    model = CANet(NUM_ITEMS, MAX_LEN).train()  # the real init, residual scales at 1e-8
    seqs = padded_batch(batch=8, seed=5)
    targets = torch.roll(seqs, -1, dims=1)
    targets[:, -1] = torch.randint(1, NUM_ITEMS + 1, (8,))
    targets[seqs == 0] = 0
    logits = model.router(seqs)
    choice = gumbel_straight_through(logits, 1.0)
    loss = next_item_loss(model.logits_masked(seqs, choice), targets)
    hits = smallest_hits(model, seqs, targets[:, -1])
    loss = loss + 0.01 * guide_loss(logits, hits, model.space) + 0.01 * uniform_loss(logits)
    loss.backward()
    for name in ["router.head.weight", "router.item_emb.weight", "router.block.attn.qkv.weight",
                 "supernet.item_emb.weight", "supernet.in_proj.weight", "supernet.out.weight",
                 "supernet.blocks.0.res_scale1", "supernet.blocks.0.ffn.fc1.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    # The router learns through the network's choice too, not only through the auxiliary losses.
    model.zero_grad()
    logits = model.router(seqs)
    next_item_loss(model.logits_masked(seqs, gumbel_straight_through(logits)), targets).backward()
    assert model.router.head.weight.grad.abs().sum() > 0


def test_single_item_sequences_give_no_nan_in_either_path():
    model = make_model(torch.float32)
    seqs = torch.zeros(4, MAX_LEN, dtype=torch.long)
    seqs[:, -1] = torch.tensor([1, 5, NUM_ITEMS, 2])
    ids = torch.tensor([0, 13, 26, 35])
    for config_id in ids.tolist():
        x = model.supernet.hidden_sliced(seqs, model.space.configs[config_id])
        assert torch.isfinite(x).all()
    assert torch.isfinite(model.supernet.hidden_masked(seqs, model.one_hot(ids))).all()
    assert torch.isfinite(model.score(seqs, ids)[:, 1:]).all()
    assert torch.isfinite(model.score_masked(seqs, model.one_hot(ids))[:, 1:]).all()
    assert torch.isfinite(model.router(seqs)).all()


def test_padding_never_influences_real_positions():
    model = make_model()
    seqs = padded_batch(batch=5, seed=6)
    seqs[:, :3] = 0
    ids = torch.arange(5) * 7
    before = model.score(seqs, ids)
    with torch.no_grad():
        model.supernet.item_emb.weight[0] += 3.0
    assert torch.allclose(model.score(seqs, ids), before, rtol=0, atol=1e-12)


# -- losses --------------------------------------------------------------------------------------


def test_soft_labels_are_the_papers():
    small, large = soft_labels(3, 2.0)
    w = np.array([1 / 8, 2 / 8, 4 / 8]) + 1e-8
    np.testing.assert_allclose(large.numpy(), w**2 / (w**2).sum(), rtol=1e-12)
    np.testing.assert_allclose(small.numpy(), large.numpy()[::-1], rtol=1e-12)
    assert small[0] > small[1] > small[2]


def test_balance_loss_by_hand():
    # Two users, each sure of a different config: the batch is balanced, so 0.
    sharp = torch.tensor([[30.0, -30.0], [-30.0, 30.0]], dtype=torch.float64)
    assert balance_loss(sharp).item() == pytest.approx(0.0, abs=1e-12)
    # Everyone on config 0 of 4: log 4.
    collapsed = torch.tensor([[60.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    assert balance_loss(collapsed).item() == pytest.approx(np.log(4), rel=1e-12)
    # A mean distribution p: sum p log(C p).
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.3, 0.2]], dtype=torch.float64)
    mean = probs.mean(0).numpy()
    logits = probs.log().requires_grad_(True)
    loss = balance_loss(logits)
    assert loss.item() == pytest.approx(float((mean * np.log(4 * mean)).sum()), rel=1e-12)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert LossWeights().balance == 0.0  # off by default: the paper's objective


def test_uniform_and_guide_loss_by_hand():
    space = RoutingSpace(depths=(1, 2), hidden=(4, 8), emb=(4,), heads=2)  # 4 configs
    assert [(c.depth, c.hidden) for c in space.configs] == [(1, 4), (2, 4), (1, 8), (2, 8)]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    logits = probs.log()
    expected_uni = -np.log([0.1, 0.2, 0.3, 0.4]).mean()
    assert uniform_loss(logits).item() == pytest.approx(expected_uni, rel=1e-12)

    emb, hidden, depth = decoupled_marginals(probs, space)
    np.testing.assert_allclose(emb.numpy(), [[1.0]])
    np.testing.assert_allclose(hidden.numpy(), [[0.3, 0.7]])
    np.testing.assert_allclose(depth.numpy(), [[0.4, 0.6]])

    def label(n, s, hit):
        w = np.array([2.0**j / 2.0**n for j in range(n)]) + 1e-8
        p = w**s / (w**s).sum()
        return p[::-1] if hit else p

    for hit in (True, False):
        expected = -(
            (label(1, 2, hit) * np.log([1.0])).sum()
            + (label(2, 2, hit) * np.log([0.3, 0.7])).sum()
            + (label(2, 1, hit) * np.log([0.4, 0.6])).sum()
        )
        got = guide_loss(logits, torch.tensor([hit]), space, LossWeights()).item()
        assert got == pytest.approx(expected, rel=1e-12)


def test_next_item_loss_ignores_padding_targets():
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    targets = torch.tensor([[0, 2, 5], [1, 0, 0]])
    picked = [(0, 1, 2), (0, 2, 5), (1, 0, 1)]
    expected = -np.mean([torch.log_softmax(logits[b, t], -1)[c].item() for b, t, c in picked])
    assert next_item_loss(logits, targets).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5),
                                        (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(monkeypatch, dtype, tol, rows):
    """The fused, chunked output layer + cross-entropy against the plain one in float64: loss
    and the gradients of x, weight and bias (row 0 and columns past h get none)."""
    import canet.losses

    monkeypatch.setattr(canet.losses, "_CE_CHUNK_ELEMENTS", 37 * 50)  # chunks of 50, a ragged end
    num_items, width, h = 36, 16, 12
    g = torch.Generator().manual_seed(rows)
    leaves = [torch.randn(shape, generator=g, dtype=torch.float64)
              for shape in ((rows, h), (num_items + 1, width), (num_items + 1,))]
    targets = torch.randint(1, num_items + 1, (rows,), generator=g)

    def run(cast, fused):
        x, weight, bias = (t.to(cast).clone().requires_grad_() for t in leaves)
        if fused:
            loss = linear_cross_entropy(x, weight, bias, targets)
        else:
            logits = torch.nn.functional.linear(x, weight[:, :h], bias)
            logits = torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], 1)
            loss = next_item_loss(logits, targets)
        (2.5 * loss).backward()  # the incoming gradient scales every gradient
        return [loss.detach().double()] + [t.grad.double() for t in (x, weight, bias)]

    want = run(torch.float64, fused=False)
    got = run(dtype, fused=True)
    for name, a, b in zip(("loss", "x", "weight", "bias"), got, want, strict=True):
        assert (a - b).abs().max() <= tol * b.abs().max(), name
    assert (got[2][0] == 0).all() and (got[2][:, h:] == 0).all() and got[3][0] == 0


def test_smallest_hits_excludes_history():
    model = make_model()
    seqs = padded_batch(batch=6, seed=11)
    scores = model.score(seqs, torch.zeros(6, dtype=torch.long))
    scores = scores.scatter(1, seqs, float("-inf"))
    best = scores.argmax(-1)
    assert smallest_hits(model, seqs, best, k=1).all()
    # A history item is never a hit, even if it would score highest.
    assert not smallest_hits(model, seqs, seqs[:, -1], k=NUM_ITEMS).any()


# -- FLOPs ---------------------------------------------------------------------------------------


def test_flops_match_the_flop_counter_for_every_config():
    model = CANet(NUM_ITEMS, MAX_LEN).eval()
    seqs = padded_batch(batch=1, seed=0)
    seqs[:] = torch.randint(1, NUM_ITEMS + 1, seqs.shape)
    for config_id, config in enumerate(model.space.configs):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.score(seqs, torch.tensor([config_id]))
        counted = counter.get_total_flops()
        formula = canet.flops(config, seq_len=MAX_LEN, num_items=NUM_ITEMS)
        assert abs(counted - formula) <= 0.02 * counted, (config, counted, formula)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.router(seqs)
    router = canet.flops_router(seq_len=MAX_LEN, n_configs=36)
    assert abs(counter.get_total_flops() - router) <= 0.02 * router


def test_flops_are_monotone_in_every_dimension():
    space = RoutingSpace()
    f = {c: canet.flops(c, 50, 3000) for c in space.configs}
    assert max(f, key=f.get) == space.configs[-1]
    assert min(f, key=f.get) == space.configs[0]


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_seqs, message",
    [
        (lambda s: s.float(), "dtype"),
        (lambda s: s.numpy(), "torch.Tensor"),
        (lambda s: s[0], "2-D"),
        (lambda s: s[:, 1:], "length"),
        (lambda s: s[:0], "empty"),
        (lambda s: s.index_fill(1, torch.tensor([2]), NUM_ITEMS + 1), r"\[0, 37\]"),
        (lambda s: s.index_fill(1, torch.tensor([2]), -1), r"\[0, 37\]"),
        (lambda s: s.index_fill(1, torch.tensor([MAX_LEN - 1]), 0), "padding"),
    ],
)
def test_bad_sequences_raise_value_error_in_every_entry_point(make_seqs, message):
    model = make_model(torch.float32)
    bad = make_seqs(padded_batch(batch=3))
    for call in (
        lambda: model.router(bad),
        lambda: model.route(bad),
        lambda: model.score(bad),
        lambda: model.score(bad, torch.zeros(3, dtype=torch.long)),
        lambda: model.score_masked(bad, model.one_hot(torch.zeros(3, dtype=torch.long))),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(
    "config_ids, message",
    [
        (torch.tensor([0, 36, 1]), r"\[0, 35\]"),
        (torch.tensor([0, -1, 1]), r"\[0, 35\]"),
        (torch.tensor([0, 1]), "shape"),
        (torch.tensor([0.0, 1.0, 2.0]), "dtype"),
        ([0, 1, 2], "torch.Tensor"),
    ],
)
def test_bad_config_ids_raise_value_error(config_ids, message):
    model = make_model(torch.float32)
    with pytest.raises(ValueError, match=message):
        model.score(padded_batch(batch=3), config_ids)


def test_bad_choice_raises_value_error():
    model = make_model(torch.float32)
    seqs = padded_batch(batch=3)
    with pytest.raises(ValueError, match="shape"):
        model.score_masked(seqs, torch.zeros(3, 35))
    with pytest.raises(ValueError, match="floating"):
        model.score_masked(seqs, torch.zeros(3, 36, dtype=torch.long))
