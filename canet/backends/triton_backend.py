"""The Triton engine backend: every group of a batch in one launch per operator.

One forward is ``3 + 5 * max_depth`` launches whatever the routing mix:

1. plan tables (:mod:`canet.kernels.plan`): tile table, launch ranges, config per row;
2. embedding gather + emb slice + input projection (grouped linear, gather A);
3. per block: qkv projection (head-major), attention, output projection + residual + LN,
   FFN1 + GELU, FFN2 + residual + LN (grouped linears and grouped attention);
4. the output layer on each user's last position, scattered to the input order.

No host sync anywhere in it, so :meth:`Backend.capture` can record it (with the router and the
device counting sort in front) in one CUDA graph whose replays are right for any routing mix.
The kernels compile on the first forward of a (dtype, max_len, catalogue size) and never again
for another batch size or a row slice of a batch (``benches/kernel_report.py`` lists the
compiles; tests/test_kernel_report.py holds it).
Activations live in preallocated per-batch-size workspaces (max width, sorted-user order).

Triton is imported only when a Backend is built: ``import canet`` never needs it. On a CPU
device the backend runs only under the Triton interpreter (``TRITON_INTERPRET=1``), for tests;
``Backend.not_supported_reasons`` still reports CPU devices, so that engines never pick it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from ..model import BLOCK_PARAMS
from ..ops import Plan, plan_reference
from ..space import RoutingSpace
from . import base
from .torch_backend import module_over

__all__ = ["Backend", "CapturedForward", "matmul_allows_tf32", "triton_version"]

_MIN_TRITON = (3, 4)


def triton_version() -> str | None:
    """The version of the importable triton, None when there is none (or it is broken).

    The distribution metadata is read first (no import); a triton installed under another
    distribution name (``pytorch-triton`` nightlies, a source build) falls back to
    ``triton.__version__``. The one probe of triton's version (``canet.info`` prints it)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        try:
            import triton

            return str(triton.__version__)
        except Exception:  # a broken install: report it as missing
            return None


def _triton_version() -> tuple[int, ...] | None:
    """(major, minor) of :func:`triton_version`, None when there is none."""
    text = triton_version()
    if text is None:
        return None
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def matmul_allows_tf32() -> bool:
    """Whether PyTorch's CUDA matmuls may use tf32 for float32, read without mixing APIs.

    Since torch 2.9, once the precision was set through the new ``fp32_precision`` API (on
    ``torch.backends`` or ``torch.backends.cuda.matmul``), reading the legacy ``allow_tf32``
    raises; the new attribute gives the effective setting ("tf32" / "ieee", "none" when neither
    API set it), and both legacy setters keep it in step."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class _Linear:
    """Host-side bundle of the tensors one grouped linear reads (built once, no copies)."""

    def __init__(self, weights, k_source: str, n_source: str) -> None:
        self.weights, self.k_source, self.n_source = weights, k_source, n_source


class _Workspace:
    """Activations of one batch size at max width, in sorted-user token rows ``[B * L, ...]``."""

    def __init__(self, backend: Backend, batch: int) -> None:
        from canet.kernels.plan import PlanBuffers

        rows = batch * backend.max_len
        dtype, device = backend.dtype, backend.device
        width = backend.space.max_hidden
        self.plan = PlanBuffers(
            batch, backend.max_len, len(backend.space), backend.space.max_depth, device
        )
        self.x = torch.empty(rows, width, dtype=dtype, device=device)
        self.o = torch.empty(rows, width, dtype=dtype, device=device)
        self.u = torch.empty(rows, 4 * width, dtype=dtype, device=device)
        self.qkv = torch.empty(
            3, backend.heads, rows, backend.head_dim_pad, dtype=dtype, device=device
        )


class Backend(base.Backend):
    """Grouped Triton kernels over the canonical state_dict (tensors read in place)."""

    NAME = "triton"
    DEVICE_TYPES = ("cuda",)
    DEVICE_HINT = (
        "move it with model.cuda() to use it (tests reach it on CPU through "
        "canet.backends.triton_backend.Backend with TRITON_INTERPRET=1)"
    )
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    PLANS_ON_DEVICE = True
    CAPTURABLE = True

    @classmethod
    def _install_reasons(cls, device: torch.device) -> list[str]:
        need = ".".join(map(str, _MIN_TRITON))
        found = _triton_version()
        if found is None:
            return [f"triton is not installed: pip install 'canet[triton]' (triton >= {need})"]
        if found < _MIN_TRITON:
            return [
                f"triton {'.'.join(map(str, found))} is too old: the kernels need "
                f"triton >= {need}"
            ]
        return []

    @classmethod
    def _build_reasons(cls, device: torch.device, dtype: torch.dtype) -> list[str]:
        # Under the interpreter the kernels run on CPU tensors (tests), though engines never
        # pick this backend there: availability keeps the device reason.
        reasons = super()._build_reasons(device, dtype)
        if device.type == "cpu" and interpreter_enabled():
            reasons.remove(cls._device_reason(device))
        return reasons

    def __init__(self, arch: dict, state: dict[str, Tensor], device: torch.device) -> None:
        super().__init__(arch, state, device)
        device = self.device
        from canet.kernels import attention, grouped_linear, plan

        self._kernels = (plan, grouped_linear, attention)
        self.model = module_over(arch, state)  # the router runs through PyTorch
        self.space: RoutingSpace = self.model.space
        self.max_len = self.model.max_len
        self.num_items = self.model.num_items
        self.heads = self.space.heads
        self.head_dim_pad = attention.head_dim_block(self.space.max_hidden, self.heads)
        # fp32 follows PyTorch's matmul switch: tf32 only when the user turned it on.
        tf32 = self.dtype == torch.float32 and matmul_allows_tf32()
        self.precision = "tf32" if tf32 else "ieee"

        table = self.space.table(device)
        self.config_table = table.to(torch.int32).contiguous()
        self.group_config = plan_reference(
            torch.arange(len(self.space), device=device), table
        ).group_config.contiguous()
        rank = torch.empty(len(self.space), dtype=torch.int32, device=device)
        rank[self.group_config] = torch.arange(len(self.space), dtype=torch.int32, device=device)
        self.config_rank = rank
        self.hidden_sizes = tuple(self.space.hidden)
        self.emb_sizes = tuple(self.space.emb)

        weights = grouped_linear.GroupedLinearWeights
        p = {k.removeprefix("supernet."): v for k, v in state.items() if k.startswith("supernet.")}
        for name in ("item_emb.weight", "pos_emb.weight"):
            if p[name].stride(1) != 1:
                raise ValueError(f"supernet.{name} needs a unit column stride")
        self.item_emb, self.pos_emb = p["item_emb.weight"], p["pos_emb.weight"]
        self.in_proj = _Linear(weights(p["in_proj.weight"], p["in_proj.bias"]), "emb", "hidden")
        self.blocks = []
        for i in range(self.space.max_depth):
            # BLOCK_PARAMS names every block tensor; without residual scaling the scales are
            # absent from the state_dict (None here).
            t = {name: p.get(f"blocks.{i}.{name}") for name in BLOCK_PARAMS}
            self.blocks.append(
                (
                    _Linear(weights(t["attn.qkv.weight"], t["attn.qkv.bias"]), "hidden", "hidden"),
                    _Linear(weights(t["attn.out.weight"], t["attn.out.bias"], t["ln1.weight"],
                                    t["ln1.bias"], t["res_scale1"]), "hidden", "hidden"),
                    _Linear(weights(t["ffn.fc1.weight"], t["ffn.fc1.bias"]), "hidden", "ffn"),
                    _Linear(weights(t["ffn.fc2.weight"], t["ffn.fc2.bias"], t["ln2.weight"],
                                    t["ln2.bias"], t["res_scale2"]), "ffn", "hidden"),
                )
            )
        self.output = _Linear(weights(p["out.weight"], p["out.bias"]), "hidden", "full")
        self._workspaces: dict[int, _Workspace] = {}

    # -- backend interface ---------------------------------------------------------------------
    def router_logits(self, seqs: Tensor) -> Tensor:
        """Router logits ``[B, C]`` (PyTorch). seqs ``[B, L]`` int64, validated by the caller."""
        return self.model.router.logits_unchecked(seqs)

    def scores(self, seqs: Tensor, plan: Plan) -> Tensor:
        """Scores ``[B, N+1]`` (users in input order) following ``plan``. seqs ``[B, L]``."""
        seqs = seqs.contiguous()
        workspace = self._workspace(seqs.shape[0])
        self._kernels[0].build_plan(
            workspace.plan, self.config_table, plan.group_config.contiguous(),
            order=plan.order.contiguous(), group_offsets=plan.group_offsets.contiguous(),
        )
        out = torch.empty(seqs.shape[0], self.num_items + 1, dtype=self.dtype, device=seqs.device)
        return self._forward(seqs, workspace, plan.order.contiguous(), out)

    def scores_from_ids(
        self, seqs: Tensor, config_ids: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """Scores ``[B, N+1]`` with the plan built on the device (counting sort, no sync).

        config_ids ``[B]`` int64 must be in range (not checked here: that would sync)."""
        seqs = seqs.contiguous()
        workspace = self._workspace(seqs.shape[0])
        self._kernels[0].build_plan(
            workspace.plan, self.config_table, self.group_config,
            config_ids=config_ids.contiguous(), config_rank=self.config_rank,
        )
        if out is None:
            out = torch.empty(
                seqs.shape[0], self.num_items + 1, dtype=self.dtype, device=seqs.device
            )
        return self._forward(seqs, workspace, workspace.plan.order, out)

    def capture(
        self, batch_size: int, routed: bool = True, penalty: Tensor | None = None
    ) -> CapturedForward:
        """Record the whole forward for ``batch_size`` users in one CUDA graph (see
        :class:`CapturedForward`). ``routed``: the graph runs the router too (with a budget's
        ``penalty [C]``, as :meth:`route`); otherwise each call passes config ids."""
        if self.device.type != "cuda":
            raise base.BackendUnavailableError(
                f"capture needs a CUDA device (CUDA graphs); this backend runs on {self.device}"
            )
        return CapturedForward(self, batch_size, routed, penalty)

    # -- internals -------------------------------------------------------------------------
    def _workspace(self, batch: int) -> _Workspace:
        workspace = self._workspaces.get(batch)
        if workspace is None:
            workspace = self._workspaces[batch] = _Workspace(self, batch)
        return workspace

    def _forward(self, seqs: Tensor, ws: _Workspace, order: Tensor, out: Tensor) -> Tensor:
        plan, grouped_linear, attention = self._kernels
        ranges = ws.plan.ranges
        row = plan.launch_row
        depth = self.space.max_depth
        common = {
            "tiles": ws.plan.tiles,
            "config_table": self.config_table,
            "hidden_sizes": self.hidden_sizes,
            "emb_sizes": self.emb_sizes,
            "seq_len": self.max_len,
            "token_capacity": ws.plan.token_capacity,
            "precision": self.precision,
        }

        def linear(epilogue: str, layer: _Linear, dst: Tensor, launch: int, **kwargs) -> None:
            grouped_linear.grouped_linear(
                epilogue, layer.weights, dst, ranges=ranges[launch], k_source=layer.k_source,
                n_source=layer.n_source, **common, **kwargs,
            )

        linear("bias", self.in_proj, ws.x, row("embed"),
               gather=(seqs, self.item_emb, self.pos_emb), order=order)
        for i, (qkv, attn_out, fc1, fc2) in enumerate(self.blocks):
            linear("qkv", qkv, ws.qkv, row("qkv", i), a=ws.x, heads=self.heads)
            attention.grouped_attention(
                ws.qkv, ws.o, seqs=seqs, order=order, row_config=ws.plan.row_config,
                config_table=self.config_table, layer=i, heads=self.heads,
                precision=self.precision,
            )
            dense = row("dense", i)
            linear("residual_ln", attn_out, ws.x, dense, a=ws.o)
            linear("gelu", fc1, ws.u, dense, a=ws.x)
            linear("residual_ln", fc2, ws.x, dense, a=ws.u)
        linear("scores", self.output, out, row("output", max_depth=depth), a=ws.x, order=order)
        return out


class CapturedForward:
    """One CUDA graph of a whole forward at a fixed batch size.

    ``captured(seqs)`` (routed) or ``captured(seqs, config_ids)`` copies the inputs into the
    graph's static buffers, replays, and returns the static ``[B, N+1]`` scores: the next call
    overwrites them (clone to keep). Inputs must be valid (ids in range, as the engine checks).
    """

    def __init__(
        self, backend: Backend, batch_size: int, routed: bool, penalty: Tensor | None = None
    ) -> None:
        device = backend.device
        self.backend, self.routed = backend, routed
        self.seqs = torch.zeros(batch_size, backend.max_len, dtype=torch.int64, device=device)
        self.seqs[:, -1] = 1  # a valid batch for the warm-up and capture runs
        self.config_ids = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.out = torch.empty(
            batch_size, backend.num_items + 1, dtype=backend.dtype, device=device
        )

        def step() -> None:
            if routed:
                self.config_ids.copy_(backend.route(self.seqs, penalty))
            backend.scores_from_ids(self.seqs, self.config_ids, out=self.out)

        # The warm-up runs compile the kernels and allocate the workspace outside the graph.
        self.graph = base.capture_cuda_graph(step, device)

    def __call__(self, seqs: Tensor, config_ids: Tensor | None = None) -> Tensor:
        if seqs.shape != self.seqs.shape:
            raise ValueError(f"captured for seqs {tuple(self.seqs.shape)}, got {tuple(seqs.shape)}")
        if (config_ids is None) != self.routed:
            raise ValueError("pass config_ids exactly when the graph was captured unrouted")
        self.seqs.copy_(seqs)
        if config_ids is not None:
            self.config_ids.copy_(config_ids)
        self.graph.replay()
        return self.out
