"""Counted FLOPs of the actual (possibly patched) model, per component, for prefill and decode.

Counting rule: **FLOPs = 2 x MACs** of the matrix products (linear layers, attention QK^T and AV,
convolutions); element-wise work (norms, RoPE, activations, softmax, residual adds) is not counted —
the same convention as `harness.efficiency.analytic`, so counted and analytic numbers agree exactly.

Two counters, one result type (`FlopsCount`):

* **fvcore** (default on real weights): `FlopCountAnalysis` traces the model with `torch.jit` through a
  wrapper that takes the processor's keyword inputs as positional tensors and returns tensors. fvcore
  counts one MAC as one "flop"; we double it. Fixes on top of stock fvcore:
  - `aten::scaled_dot_product_attention` has no handle: we add one (`B*H_q*L_q*L_k*(d_qk + d_v)` MACs
    from the query/key/value shapes; the query's own head count, so GQA with `enable_gqa`, `repeat_kv`
    or HF's single-query `pack_gqa` layout are all right);
  - `aten::matmul`/`mm`/`bmm` are re-counted from the output shape (`prod(out) * K`), correct under
    broadcasting; `baddbmm`, `addbmm`, `mv`, `addmv`, `dot` are added;
  - `layer_norm`/`group_norm`/`batch_norm`/upsampling handles are switched off (element-wise);
  - jit tracing removes work whose result is unused: with `vision_feature_layer=-2` the last CLIP layer
    would vanish from the trace although Hugging Face really runs it. The wrapper therefore also returns
    the vision tower's `last_hidden_state` (captured by a forward hook), so the count is what runs.
  - LLaVA-NeXT's anyres packing (`unpad_image`) cannot be jit-traced: its vision tower and projector
    are traced by replaying their real calls, and the rest of the model with the image features
    precomputed (`mm_encoder_outputs`, the model's own input for that).
  Ops fvcore cannot count are collected in `unsupported_ops` (element-wise ops that the convention
  excludes are ignored explicitly, so anything listed there is worth a look); nothing is printed.
* **torch.utils.flop_counter**'s formulas (counter name `flop_counter_mode`; used automatically for models
  on the *meta* device, i.e. full-size architectures without weights — fvcore's jit tracing fails on
  meta convolutions). FLOPs (2 per MAC) are counted at the dispatcher level by FlopCounterMode's formula
  table, without its per-module bookkeeping (`_FlopFormulaMode`); we add the CPU flash-SDPA formula it
  lacks. An op's output shapes are reused for later calls on the same operand shapes (the meta-op
  cache below: a 13B count in well under a second instead of about two). On meta, Hugging Face's
  data-dependent checks must be off (`TRANSFORMERS_DISABLE_TORCH_CHECK=1`, set only for the duration
  of the count) and an empty `DynamicCache` is passed.

`count_prefill_and_decode` gives both with one forward less (`flop_counter_mode` path). If a patched model
cannot run on meta (data-dependent method code), `analytic_count` gives the method's analytic numbers
labelled `source="analytic"`.

Conventions of the numbers:

* prefill = one forward over the prompt with a KV cache, logits for the **last position only**
  (`logits_to_keep=1`, what `generate` does), so `lm_head` = B x hidden x vocab MACs;
* decode = one single-token forward after a prefill (the cache holds the prompt), `lm_head` for 1 token:
  on real weights `generate`'s own first decode step (its inputs and cache, see `count_decode`);
* all numbers are for the whole batch given (padding tokens included: the model computes them).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

from harness.efficiency import analytic as A
# the analytic counterparts every count is compared with, and synthetic prompts (harness.efficiency.layouts)
from harness.efficiency.layouts import (  # noqa: F401
    ANYRES, analytic_decode, analytic_prefill, default_image_hw, num_crops, projected_tokens, synthetic_inputs,
    synthetic_layout, visual_tokens_for_image,
)

COMPONENTS = ("vision", "projector", "llm", "lm_head")

# Element-wise / bookkeeping ops that the counting convention excludes (not "unsupported").
_UNCOUNTED_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::pow", "aten::mean", "aten::sum", "aten::rsqrt", "aten::sqrt", "aten::neg",
    "aten::silu", "aten::gelu", "aten::sigmoid", "aten::tanh", "aten::relu", "aten::softmax",
    "aten::_softmax", "aten::log_softmax", "aten::exp", "aten::embedding", "aten::masked_scatter",
    "aten::new_ones", "aten::new_zeros", "aten::ones", "aten::ones_like", "aten::zeros",
    "aten::zeros_like", "aten::le", "aten::lt", "aten::ne", "aten::cos", "aten::sin", "aten::cumsum",
    "aten::layer_norm", "aten::group_norm", "aten::batch_norm", "aten::instance_norm", "aten::norm",
    "aten::linalg_vector_norm", "aten::upsample_nearest2d", "aten::upsample_bilinear2d",
    "aten::upsample_bicubic2d", "aten::_upsample_bicubic2d_aa",
    "aten::adaptive_avg_pool2d", "aten::grid_sampler", "aten::any", "aten::all", "aten::abs",
    "aten::where", "aten::logical_and", "aten::logical_or", "aten::logical_not", "aten::clone",
    "aten::type_as", "aten::triu", "aten::tril", "aten::argmax", "aten::topk", "aten::sort",
    "aten::argsort", "aten::index_select", "aten::scatter", "aten::scatter_add", "aten::scatter_",
    "aten::scatter_add_", "aten::fill_", "aten::masked_fill_", "aten::stack", "aten::split",
    "aten::split_with_sizes", "aten::unbind", "aten::repeat", "aten::repeat_interleave", "aten::minimum",
    "aten::maximum", "aten::min", "aten::amax", "aten::to", "aten::float", "aten::nonzero",
    "aten::bitwise_and", "aten::bitwise_or", "aten::reciprocal", "aten::erf", "aten::log",
    "aten::dropout", "aten::feature_dropout", "aten::alias", "aten::lift_fresh", "aten::item",
    "aten::resolve_conj", "aten::resolve_neg", "aten::__or__", "aten::__iand__", "aten::__ior__",
    "aten::max_pool2d", "aten::avg_pool2d", "aten::pad", "aten::unsqueeze_", "aten::squeeze_",
    "aten::expand_as", "aten::view_as", "aten::reshape_as", "aten::masked_select", "aten::index_add",
    "aten::index_add_", "aten::index_copy", "aten::index_copy_", "aten::take_along_dim", "aten::diff",
    "aten::sign", "aten::square", "aten::exp_", "aten::div_", "aten::sub_", "aten::neg_", "aten::cumprod",
    "aten::argmin", "aten::randperm", "aten::rand", "aten::randn", "aten::bernoulli", "aten::multinomial",
    "aten::linspace", "aten::round", "aten::ceil", "aten::remainder", "aten::fmod", "aten::isin",
    "aten::unique_dim", "aten::_unique2", "aten::bucketize", "aten::searchsorted", "aten::count_nonzero",
    "aten::prod", "aten::std", "aten::var", "aten::softplus", "aten::hardtanh",
    "aten::quick_gelu", "aten::log1p", "aten::expm1", "aten::atan2", "aten::min_", "aten::max_",
    "aten::eq_", "aten::ge_", "aten::_unsafe_view", "aten::unfold", "aten::roll",
    "aten::scatter_reduce", "aten::scatter_reduce_", "aten::quantile", "aten::nanquantile", "aten::median",
    "aten::flip", "aten::clamp_min", "aten::clamp_max", "aten::clamp_min_", "aten::pin_memory",
)


# ---- result ------------------------------------------------------------------------------------------
@dataclass
class FlopsCount:
    """FLOPs (= 2 x MACs) of one forward, per component, for the whole batch."""

    phase: str  # "prefill" | "decode"
    flops: dict[str, int]  # vision, projector, llm, lm_head (+ "other" if anything ran outside them)
    source: str = "counted"  # "counted" | "analytic"
    counter: str = "fvcore"  # "fvcore" | "flop_counter_mode" | "analytic"
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    batch_size: int = 1
    seq_len: int = 0  # tokens in input_ids of this forward
    context: int = 0  # cached tokens before this forward (decode)
    note: str = ""
    #: decode only: cached tokens per LLM layer before the step (methods may shrink some layers' cache)
    kv_lengths: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.flops.values()))

    @property
    def macs(self) -> dict[str, int]:
        return {k: v // 2 for k, v in self.flops.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "flops": dict(self.flops),
            "total": self.total,
            "source": self.source,
            "counter": self.counter,
            "unsupported_ops": dict(self.unsupported_ops),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "context": self.context,
            "note": self.note,
            "kv_lengths": list(self.kv_lengths),
        }


# ---- fvcore handles ------------------------------------------------------------------------------------
def _shape(val) -> list[int] | None:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(val)


def _matmul_macs(inputs, outputs) -> int:
    """matmul / mm / bmm: prod(output shape) x K, correct with broadcasting and 1-D operands."""
    a = _shape(inputs[0])
    out = _shape(outputs[0])
    return int(prod(out) * a[-1]) if out else int(a[-1])


def _conv_mode_macs(inputs, outputs) -> int:
    """aten::_convolution_mode(x, w, b, stride, padding: str, dilation, groups): out elements x (C_in /
    groups) x kernel elements (w's shape [C_out, C_in / groups, *kernel]), as fvcore counts aten::_convolution."""
    w, out = _shape(inputs[1]), _shape(outputs[0])
    return prod(out) * prod(w[1:]) if w and out else 0


def _baddbmm_macs(inputs, outputs) -> int:
    # baddbmm(self, batch1, batch2, ...), addbmm(self, batch1, batch2, ...)
    b1, b2 = _shape(inputs[1]), _shape(inputs[2])
    return int(prod(b1) * b2[-1])


def _addmv_macs(inputs, outputs) -> int:
    return int(prod(_shape(inputs[1])))


def _mv_macs(inputs, outputs) -> int:
    return int(prod(_shape(inputs[0])))


def _dot_macs(inputs, outputs) -> int:
    return int(prod(_shape(inputs[0])))


def sdpa_macs(q: list[int], k: list[int], v: list[int], out: list[int] | None = None) -> int:
    """MACs of scaled-dot-product attention: QK^T and AV over the full L_q x L_k score matrix.

    Leading (batch x head) dims are taken from the output (= broadcast of the query's), so GQA
    (`enable_gqa`, fewer key/value heads) is counted with the query heads: B*H_q*L_q*L_k*(d_qk + d_v).
    """
    lead = out[:-2] if out else q[:-2]
    lq, dqk = q[-2], q[-1]
    lk, dv = k[-2], v[-1]
    return int(prod(lead) * lq * lk * (dqk + dv))


def _sdpa_jit(inputs, outputs) -> int:
    return sdpa_macs(_shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]), _shape(outputs[0]))


def _fvcore_handles() -> dict[str, Any]:
    """The complete handle set (installed after `clear_op_handles()`): fvcore's own linear / addmm /
    convolution / einsum handles, ours for the rest, and `None` (ignored) for uncounted ops."""
    from fvcore.nn.jit_handles import addmm_flop_jit, conv_flop_jit, einsum_flop_jit, linear_flop_jit

    handles: dict[str, Any] = {
        "aten::linear": linear_flop_jit,
        "aten::addmm": addmm_flop_jit,
        "aten::_convolution": conv_flop_jit,
        # convolutions with string padding ("valid", SigLIP's patch embedding) trace to _convolution_mode
        "aten::_convolution_mode": _conv_mode_macs,
        "aten::einsum": einsum_flop_jit,
        "aten::scaled_dot_product_attention": _sdpa_jit,
        "aten::matmul": _matmul_macs,
        "aten::mm": _matmul_macs,
        "aten::bmm": _matmul_macs,
        "aten::baddbmm": _baddbmm_macs,
        "aten::addbmm": _baddbmm_macs,
        "aten::baddbmm_": _baddbmm_macs,
        "aten::mv": _mv_macs,
        "aten::addmv": _addmv_macs,
        "aten::dot": _dot_macs,
        "aten::vdot": _dot_macs,
    }
    for op in _UNCOUNTED_OPS:
        handles.setdefault(op, None)
    return handles


# ---- helpers -------------------------------------------------------------------------------------------
def _adapter(model):
    from harness.models import get_adapter

    return get_adapter(model)


def _component_modules(adapter) -> dict[str, torch.nn.Module]:
    return {
        "vision": adapter.vision_tower,
        "projector": adapter.projector,
        "llm": adapter.language_model,
        "lm_head": adapter.lm_head,
    }


def _unnest(flops: dict, adapter) -> dict:
    """A projector that lives inside the vision tower (Qwen2-VL's merger) is counted in both modules:
    take it out of `vision` (the per-component numbers then add up to the total)."""
    proj, vis = adapter.projector, adapter.vision_tower
    if any(m is proj for m in vis.modules()) and "vision" in flops:
        flops = dict(flops, vision=flops["vision"] - flops.get("projector", 0))
    return flops


def is_meta(model) -> bool:
    p = next(iter(model.parameters()), None)
    return p is not None and p.device.type == "meta"


@contextlib.contextmanager
def _quiet():
    """Silence fvcore / jit / transformers chatter for the duration of a count."""
    names = ("fvcore", "fvcore.nn.jit_analysis", "transformers", "torch")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tensor_inputs(inputs: dict, model=None) -> dict[str, torch.Tensor]:
    """The processor's tensor inputs (a BatchFeature or a dict), in a stable order; with `model` (not
    on meta) moved to its device, floating-point ones cast to its dtype."""
    out = {}
    for k, v in dict(inputs).items():
        if isinstance(v, torch.Tensor):
            out[k] = v
    if "input_ids" not in out:
        raise ValueError("inputs must contain input_ids")
    if model is not None and not is_meta(model):
        p = next(iter(model.parameters()))
        out = {k: (v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)) for k, v in out.items()}
    return out


class _Wrapper(torch.nn.Module):
    """Calls the model with keyword inputs rebuilt from positional tensors; returns only tensors."""

    def __init__(self, model, keys, extra: dict, vision_tower, cache_factory=None):
        super().__init__()
        self.model = model
        self._keys = tuple(keys)
        self._extra = extra
        self._cache_factory = cache_factory
        self._vision = vision_tower
        self._captured: list[torch.Tensor] = []

    def forward(self, *args):
        kwargs = dict(zip(self._keys, args))
        kwargs.update(self._extra)
        if self._cache_factory is not None:
            kwargs["past_key_values"] = self._cache_factory()
        self._captured = []

        def grab(_m, _i, out):
            hs = getattr(out, "last_hidden_state", None)
            if hs is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                hs = out[0]
            if isinstance(hs, torch.Tensor):
                self._captured.append(hs)

        h = self._vision.register_forward_hook(grab)
        try:
            out = self.model(**kwargs)
        finally:
            h.remove()
        return (out.logits, *self._captured)


def _fvcore_count(model, adapter, tensors: dict, extra: dict, cache_factory=None):
    from fvcore.nn import FlopCountAnalysis

    keys = list(tensors)
    wrapper = _Wrapper(model, keys, extra, adapter.vision_tower, cache_factory)
    fa = FlopCountAnalysis(wrapper, tuple(tensors[k] for k in keys))
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    fa.clear_op_handles().set_op_handle(**_fvcore_handles())
    with _quiet(), torch.no_grad():
        total = int(fa.total())
        by_module = fa.by_module()
        unsupported = {k: int(v) for k, v in fa.unsupported_ops().items()}
    names = {id(m): n for n, m in wrapper.named_modules()}
    macs = {c: int(by_module.get(names[id(m)], 0)) for c, m in _component_modules(adapter).items()}
    macs = _unnest(macs, adapter)
    other = total - sum(macs.values())
    flops = {c: 2 * v for c, v in macs.items()}
    if other:
        flops["other"] = 2 * other
    return flops, unsupported


class _CallReplay(torch.nn.Module):
    """Replays one captured call of `module` (its real args/kwargs); returns every tensor output so
    jit tracing keeps all the work (nothing of it is dead code)."""

    def __init__(self, module, args, kwargs):
        super().__init__()
        self.module = module
        self._args, self._kwargs = args, kwargs

    def forward(self, *tensors):
        args = list(self._args)
        args[: len(tensors)] = tensors
        out = self.module(*args, **self._kwargs)
        flat = []

        def walk(x):
            if isinstance(x, torch.Tensor):
                flat.append(x)
            elif isinstance(x, dict) or hasattr(x, "to_tuple"):
                for v in (x.values() if isinstance(x, dict) else x.to_tuple()):
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)

        walk(out)
        return tuple(flat)


def _capture_calls(model, modules: dict, kwargs: dict) -> dict[str, list]:
    """Run `model(**kwargs)` for real; record each call (args, kwargs) of the given modules."""
    calls: dict[str, list] = {k: [] for k in modules}
    handles = []
    for name, mod in modules.items():
        def pre(_m, args, kw, name=name):
            calls[name].append((args, dict(kw)))

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad(), _quiet():
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _fvcore_trace_macs(module: torch.nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(module, inputs)
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    fa.clear_op_handles().set_op_handle(**_fvcore_handles())
    with _quiet(), torch.no_grad():
        return int(fa.total()), {k: int(v) for k, v in fa.unsupported_ops().items()}


def _fvcore_split_count(model, adapter, tensors: dict, extra: dict):
    """LLaVA-NeXT: its anyres packing (`unpad_image`) cannot be jit-traced, so the vision tower and
    the projector are traced separately by replaying their real calls, and the rest of the model
    (LLM, lm_head, method code) is traced with the image features precomputed
    (`mm_encoder_outputs`, the model's own public input for that)."""
    comps = {"vision": adapter.vision_tower, "projector": adapter.projector}
    calls = _capture_calls(model, comps, dict(tensors, **extra))
    flops: dict[str, int] = {}
    unsupported: dict[str, int] = {}
    for comp, mod in comps.items():
        total = 0
        for args, kw in calls[comp]:
            n_t = 0
            while n_t < len(args) and isinstance(args[n_t], torch.Tensor):
                n_t += 1
            macs, uns = _fvcore_trace_macs(_CallReplay(mod, args, kw), tuple(args[:n_t]))
            total += macs
            for k, v in uns.items():
                unsupported[k] = unsupported.get(k, 0) + v
        flops[comp] = 2 * total
    rest = {k: v for k, v in tensors.items() if k not in ("pixel_values", "image_sizes")}
    if "pixel_values" in tensors:
        with torch.no_grad(), _quiet():
            feats = adapter.base.get_image_features(
                tensors["pixel_values"], tensors.get("image_sizes"), return_dict=True
            )
        extra = dict(extra, mm_encoder_outputs={"image": feats})
    llm_flops, uns = _fvcore_count(model, adapter, rest, extra)
    for k, v in uns.items():
        unsupported[k] = unsupported.get(k, 0) + v
    for comp in ("llm", "lm_head", "other"):
        if llm_flops.get(comp):
            flops[comp] = llm_flops[comp]
    for comp in ("vision", "projector"):
        if llm_flops.get(comp):  # the precomputed features should leave nothing here
            flops["other"] = flops.get("other", 0) + llm_flops[comp]
    return {c: flops.get(c, 0) for c in COMPONENTS} | ({"other": flops["other"]} if flops.get("other") else {}), unsupported


def _fcm_sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_macs(list(q), list(k), list(v))


# ---- meta-device op cache ------------------------------------------------------------------------------
# On the meta device an op costs Python time, not arithmetic: many meta kernels are torch's reference
# implementations (broadcasting, type promotion, the output's memory format, about 0.2 ms per element-wise
# op), most of a meta-device forward's time, while a decoder repeats the same operand shapes in every
# layer. For a functional op (no mutated or aliased operand or output) the output's shape, strides and
# dtype depend only on the operands' metadata and the other arguments, never on values (meta tensors have
# none), so `_FlopFormulaMode` runs the kernel the first time it sees an op on given metadata
# (`_meta_key`) and afterwards makes the outputs directly. FLOP formulas still run on every call; ops that
# decompose are never cached (their parts are what gets counted). Tests run whole forwards with
# `check_meta_cache` on, which compares every cached answer against the kernel's.

_FUNCTIONAL: dict[Any, bool] = {}
#: outputs' (shape, strides, dtype) per `_meta_key`; shared by every count in the process
_META_OUT: dict[tuple, tuple] = {}
#: how often the cache answered (hits) or learned (misses), over the process
META_CACHE_STATS = {"hits": 0, "misses": 0}


def _functional(func) -> bool:
    """No mutable or aliased argument and only fresh Tensor outputs (views and in-place ops excluded)."""
    ok = _FUNCTIONAL.get(func)
    if ok is None:
        sch = func._schema
        ok = (not sch.is_mutable and bool(sch.returns)
              and all(r.alias_info is None and isinstance(r.type, torch.TensorType) for r in sch.returns)
              and all(a.alias_info is None for a in sch.arguments))
        _FUNCTIONAL[func] = ok
    return ok


_PLAIN = (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _meta_key(func, args: tuple, kwargs: dict):
    """What a functional op's output metadata depend on: the op, each meta tensor's shape, strides and
    dtype, every other argument's type and value. None if anything else is among the arguments."""
    key = [func]

    def add(a) -> bool:
        if isinstance(a, torch.Tensor):
            if a.device.type != "meta":
                return False
            key.append((tuple(a.shape), a.stride(), a.dtype))
        elif isinstance(a, (list, tuple)):
            key.append(len(a))
            return all(add(x) for x in a)
        elif a is None or isinstance(a, _PLAIN):
            key.append((type(a), a))
        else:
            return False
        return True

    if not all(add(a) for a in args):
        return None
    for k in sorted(kwargs):
        key.append(k)
        if not add(kwargs[k]):
            return None
    return tuple(key)


def _meta_outputs(out) -> tuple | None:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(o, torch.Tensor) and o.device.type == "meta" and o.storage_offset() == 0 for o in outs):
        return None
    return (isinstance(out, (tuple, list)),) + tuple((tuple(o.shape), o.stride(), o.dtype) for o in outs)


def _make_outputs(meta: tuple):
    outs = [torch.empty_strided(sh, st, dtype=dt, device="meta") for sh, st, dt in meta[1:]]
    return tuple(outs) if meta[0] else outs[0]


class _FlopFormulaMode:
    """torch's own FLOP formulas (`torch.utils.flop_counter.flop_registry`, the table FlopCounterMode
    reads) applied to every aten op a forward dispatches, summed into one running total.

    FlopCounterMode itself also keeps a per-module breakdown: it hooks every module call and adds each
    op's count to all enclosing modules, about a quarter of the time of a meta-device forward. The four
    components are taken from forward hooks on their modules instead (`_flop_counter_count`), so the
    running total is all we need. Same formulas, same ops (a test checks the totals against
    FlopCounterMode's and against fvcore's).
    """

    #: tests set this: cache hits run the op's kernel too and compare (see `_META_OUT`)
    check_meta_cache = False

    def __init__(self, custom_mapping: dict):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in custom_mapping.items()}}
        skip = {torch.ops.aten.size.default, torch.ops.aten.sym_size.default, torch.ops.aten.stride.default,
                torch.ops.aten.numel.default, torch.ops.aten.dim.default}
        counter = self
        stats = META_CACHE_STATS

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in skip:
                    return NotImplemented
                formula = registry.get(func._overloadpacket)
                key = _meta_key(func, args, kwargs) if _functional(func) else None
                meta = _META_OUT.get(key) if key is not None else None
                if meta is not None:
                    stats["hits"] += 1
                if meta is not None and not counter.check_meta_cache:
                    out = _make_outputs(meta)
                else:
                    if formula is None and func is not torch.ops.prim.device.default:
                        # as FlopCounterMode: an op without a formula may decompose into ops with one
                        r = func.decompose(*args, **kwargs)
                        if r is not NotImplemented:
                            return r
                    out = func(*args, **kwargs)
                    if key is not None:
                        got = _meta_outputs(out)
                        if meta is not None and got != meta:
                            raise AssertionError(f"{func}: cached outputs {meta} != the kernel's {got}")
                        if got is not None and meta is None:
                            stats["misses"] += 1
                            if len(_META_OUT) > 100_000:
                                _META_OUT.clear()
                            _META_OUT[key] = got
                if formula is not None:
                    counter.total += formula(*args, **kwargs, out_val=out)
                return out

        self.total = 0
        self._mode = Mode()

    def get_total_flops(self) -> int:
        return self.total

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _flop_counter_count(model, adapter, kwargs: dict):
    """One forward under torch's FLOP formulas; per component from forward hooks on the four modules."""
    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = _fcm_sdpa_cpu
    counter = _FlopFormulaMode(mapping)
    acc = {c: 0 for c in COMPONENTS}
    start: dict[str, int] = {}
    handles = []
    for comp, mod in _component_modules(adapter).items():
        def pre(_m, _i, comp=comp):
            start[comp] = counter.get_total_flops()

        def post(_m, _i, _o, comp=comp):
            acc[comp] += counter.get_total_flops() - start.pop(comp)

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        with _quiet(), torch.no_grad(), counter:
            out = model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()
    flops = _unnest(dict(acc), adapter)
    other = total - sum(flops.values())
    if other:
        flops["other"] = other
    return flops, out


@contextlib.contextmanager
def _meta_env(model=None):
    """Counting on meta: Hugging Face's data-dependent checks off; modules that compute from values kept
    on the CPU (Qwen2-VL's vision rotary embedding: positions from `image_grid_thw`) get them moved to meta."""
    handles = []
    if model is not None:
        mod = getattr(_adapter(model), "vision_rotary", None)
        if mod is not None:
            def to_meta(_m, args, kwargs):
                move = lambda t: t.to("meta") if isinstance(t, torch.Tensor) and t.device.type != "meta" else t
                return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

            handles.append(mod.register_forward_pre_hook(to_meta, with_kwargs=True))
    try:
        with _env(TRANSFORMERS_DISABLE_TORCH_CHECK="1"):
            yield
    finally:
        for h in handles:
            h.remove()


def _empty_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.text_config)


# ---- public API ---------------------------------------------------------------------------------------
def count_prefill(model, inputs: dict, *, counter: str | None = None, logits_to_keep: int = 1) -> FlopsCount:
    """FLOPs of one prefill forward of `model` (as patched) on the processor's `inputs`, per component.

    counter: "fvcore" (default for real weights) or "flop_counter_mode" (default, and the only option,
    on the meta device).
    """
    adapter = _adapter(model)
    tensors = _tensor_inputs(inputs, model)
    ids = tensors["input_ids"]
    meta = is_meta(model)
    counter = counter or ("flop_counter_mode" if meta else "fvcore")
    if counter == "fvcore":
        if meta:
            raise ValueError("fvcore cannot trace a meta-device model; use counter='flop_counter_mode'")
        extra = {"use_cache": True, "logits_to_keep": logits_to_keep}
        if adapter.family in ANYRES:
            flops, unsupported = _fvcore_split_count(model, adapter, tensors, extra)
        else:
            flops, unsupported = _fvcore_count(model, adapter, tensors, extra)
    elif counter == "flop_counter_mode":
        kwargs = dict(tensors, use_cache=True, logits_to_keep=logits_to_keep, past_key_values=_empty_cache(model))
        with _meta_env(model) if meta else contextlib.nullcontext():
            flops, _ = _flop_counter_count(model, adapter, kwargs)
        unsupported = {}
    else:
        raise ValueError(f"unknown counter {counter!r} (fvcore, flop_counter_mode)")
    return FlopsCount(
        phase="prefill", flops=flops, counter=counter, unsupported_ops=unsupported,
        batch_size=int(ids.shape[0]), seq_len=int(ids.shape[1]), context=0,
    )


def _prefill_for_decode(model, tensors: dict):
    """Run a real prefill; return (cache, next-token ids [B,1], attention mask extended by one)."""
    cache = _empty_cache(model)
    with torch.no_grad():
        out = model(**tensors, use_cache=True, past_key_values=cache, logits_to_keep=1)
    cache = out.past_key_values
    ids = tensors["input_ids"]
    if is_meta(model):
        nxt = torch.zeros(ids.shape[0], 1, dtype=ids.dtype, device=ids.device)
    else:
        nxt = out.logits[:, -1].argmax(-1, keepdim=True).to(ids.dtype)
    am = tensors.get("attention_mask")
    if am is not None:
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
    return cache, nxt, am


def _generate_decode_step(model, tensors: dict) -> tuple[dict, Any]:
    """The keyword inputs `generate` gives the model's forward for its first decode step after a prefill
    of `tensors`, and the KV cache as that step receives it (prefill entries only), captured by a forward
    pre-hook on a real two-token greedy `generate`. Family-specific decode inputs (Qwen2-VL's 3D M-RoPE
    positions from its stored rope deltas, `cache_position`, the extended attention mask) are therefore
    exactly `generate`'s, and the prefill is the one `generate` runs (a method's patched `generate`
    included)."""
    seen: dict[str, Any] = {"calls": 0}

    def grab(_module, _args, kwargs):
        seen["calls"] += 1
        if seen["calls"] == 2:  # the first decode step: copy its inputs before the forward appends to the cache
            seen["kwargs"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()
                              if k != "past_key_values"}
            seen["cache"] = copy.deepcopy(kwargs.get("past_key_values"))

    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, num_beams=1, use_cache=True)
    from harness.efficiency.latency import pad_token_id

    pad = pad_token_id(model)
    if pad is not None:
        gen["pad_token_id"] = pad
    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**tensors, **gen)
    finally:
        handle.remove()
    if "kwargs" not in seen or seen["cache"] is None:
        raise RuntimeError("count_decode: generate ran no decode step with a KV cache")
    return seen["kwargs"], seen["cache"]


def count_decode(model, inputs: dict, *, counter: str | None = None) -> FlopsCount:
    """FLOPs of one decode step (a single new token per sample) after a prefill of `inputs`.

    fvcore (real weights): the counted forward is `generate`'s own first decode step -- its keyword inputs
    and its KV cache, captured from a real greedy `generate` (`_generate_decode_step`), so families whose
    decode needs more than the new token and the mask (Qwen2-VL's M-RoPE positions) are counted as they
    run. On the meta device (`flop_counter_mode`) the prefill runs first (not counted) and the step is the
    new token with the extended mask and that cache, no pixel values.
    """
    adapter = _adapter(model)
    tensors = _tensor_inputs(inputs, model)
    meta = is_meta(model)
    counter = counter or ("flop_counter_mode" if meta else "fvcore")
    if counter == "fvcore":
        if meta:
            raise ValueError("fvcore cannot trace a meta-device model; use counter='flop_counter_mode'")
        with _quiet():
            kwargs, cache = _generate_decode_step(model, tensors)
        step = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        extra = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor) and v is not None}
        extra.setdefault("use_cache", True)
        nxt = step["input_ids"]
        context = int(cache.get_seq_length())
        kv_lengths = cache_lengths(cache)
        flops, unsupported = _fvcore_count(model, adapter, step, extra, cache_factory=lambda: copy.deepcopy(cache))
    elif counter == "flop_counter_mode":
        with _meta_env(model) if meta else contextlib.nullcontext(), _quiet():
            cache, nxt, am = _prefill_for_decode(model, tensors)
        context = int(cache.get_seq_length())
        kv_lengths = cache_lengths(cache)
        step = {"input_ids": nxt}
        if am is not None:
            step["attention_mask"] = am
        kwargs = dict(step, use_cache=True, logits_to_keep=1, past_key_values=copy.deepcopy(cache))
        with _meta_env(model) if meta else contextlib.nullcontext():
            flops, _ = _flop_counter_count(model, adapter, kwargs)
        unsupported = {}
    else:
        raise ValueError(f"unknown counter {counter!r} (fvcore, flop_counter_mode)")
    return FlopsCount(
        phase="decode", flops=flops, counter=counter, unsupported_ops=unsupported,
        batch_size=int(nxt.shape[0]), seq_len=1, context=context, kv_lengths=kv_lengths,
    )


def count_prefill_and_decode(model, inputs: dict, *, counter: str | None = None) -> tuple[FlopsCount, FlopsCount]:
    """`(count_prefill, count_decode)` of the same inputs; with `flop_counter_mode` (the meta-device path)
    the counted prefill's own cache feeds the decode step, saving one forward."""
    meta = is_meta(model)
    counter = counter or ("flop_counter_mode" if meta else "fvcore")
    if counter != "flop_counter_mode":
        return count_prefill(model, inputs, counter=counter), count_decode(model, inputs, counter=counter)
    adapter = _adapter(model)
    tensors = _tensor_inputs(inputs, model)
    ids = tensors["input_ids"]
    kwargs = dict(tensors, use_cache=True, logits_to_keep=1, past_key_values=_empty_cache(model))
    with _meta_env(model) if meta else contextlib.nullcontext():
        flops, out = _flop_counter_count(model, adapter, kwargs)
        cache = out.past_key_values
        if meta:
            nxt = torch.zeros(ids.shape[0], 1, dtype=ids.dtype, device=ids.device)
        else:
            nxt = out.logits[:, -1].argmax(-1, keepdim=True).to(ids.dtype)
        step = {"input_ids": nxt}
        am = tensors.get("attention_mask")
        if am is not None:
            step["attention_mask"] = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
        context = int(cache.get_seq_length())
        kv_lengths = cache_lengths(cache)
        dflops, _ = _flop_counter_count(model, adapter, dict(step, use_cache=True, logits_to_keep=1, past_key_values=cache))
    pre = FlopsCount(phase="prefill", flops=flops, counter=counter, batch_size=int(ids.shape[0]),
                     seq_len=int(ids.shape[1]), context=0)
    dec = FlopsCount(phase="decode", flops=dflops, counter=counter, batch_size=int(ids.shape[0]),
                     seq_len=1, context=context, kv_lengths=kv_lengths)
    return pre, dec


# ---- analytic counterparts --------------------------------------------------------------------------


def layouts_from_inputs(model_or_config, inputs: dict) -> list[A.TokenLayout]:
    """Per-sample `TokenLayout` (padding excluded) of processor inputs: text before the first image
    token, image tokens in `input_ids`, text between the first and last image token, text after;
    `images` = encoder passes (LLaVA-1.5: images; NeXT: crops of the sample's images, which are taken
    from `image_sizes` in batch order), `n_images` = images of the sample."""
    config = getattr(model_or_config, "config", model_or_config)
    tensors = _tensor_inputs(inputs)
    ids = tensors["input_ids"]
    if ids.device.type == "meta":
        raise ValueError("input_ids on the meta device have no values; use synthetic_layout()")
    am = tensors.get("attention_mask")
    img_id = int(config.image_token_id)
    sizes = tensors.get("image_sizes")
    sizes = [] if sizes is None else [s.tolist() for s in sizes]
    grids = tensors.get("image_grid_thw")
    grids = [] if grids is None else [tuple(int(x) for x in g) for g in grids]
    per_image = visual_tokens_for_image(config)
    next_image = 0
    out = []
    for b in range(ids.shape[0]):
        row = ids[b]
        if am is not None:
            row = row[am[b].bool()]
        vis = (row == img_id).nonzero().flatten()
        n_vis = int(vis.numel())
        before = int(vis[0]) if n_vis else int(row.numel())
        between = int(vis[-1]) - before + 1 - n_vis if n_vis else 0
        after = int(row.numel()) - before - between - n_vis
        if n_vis == 0:
            images = n_images = 0
        elif getattr(config, "model_type", None) in ANYRES and sizes:
            images = n_images = left = 0
            while left < n_vis and next_image < len(sizes):  # this sample's images, in batch order
                size = sizes[next_image]
                left += visual_tokens_for_image(config, tuple(size))
                images += num_crops(config, size)
                n_images += 1
                next_image += 1
            if left != n_vis:
                raise ValueError(f"sample {b}: {n_vis} image tokens do not match its images' sizes")
        elif getattr(config, "model_type", None) in A.QWEN_VL_FAMILIES:
            per, rc, left = [], [], n_vis
            m = config.vision_config.spatial_merge_size
            while left > 0 and next_image < len(grids):  # this sample's images, in batch order
                t, h, w = grids[next_image]
                per.append(t * h * w // m**2)
                rc.append((h // m, w // m))
                left -= per[-1]
                next_image += 1
            if left != 0:
                raise ValueError(f"sample {b}: {n_vis} image tokens do not match its images' grids")
            out.append(A.TokenLayout(before=before, visual=n_vis, after=after, images=len(per), between=between,
                                     n_images=len(per), image_visual=tuple(per), image_grids=tuple(rc)))
            continue
        else:
            n_images = images = max(1, n_vis // per_image)
        out.append(A.TokenLayout(before=before, visual=n_vis, after=after, images=images, between=between,
                                 n_images=n_images))
    return out


def analytic_count(config, layout: A.TokenLayout, method=None, phase: str = "prefill",
                   context: int | None = None) -> FlopsCount:
    """A `FlopsCount` from the analytic formulas (`source="analytic"`), batch 1: the labelled fallback
    when the patched model cannot be run for counting (e.g. data-dependent method code on meta)."""
    if phase == "prefill":
        flops = analytic_prefill(config, layout, method)
        seq, ctx = layout.total, 0
    elif phase == "decode":
        ctx = layout.total if context is None else context
        flops, seq = analytic_decode(config, ctx), 1
    else:
        raise ValueError(f"unknown phase {phase!r} (prefill, decode)")
    return FlopsCount(phase=phase, flops=flops, source="analytic", counter="analytic", batch_size=1,
                      seq_len=seq, context=ctx)


def cache_lengths(cache) -> list[int]:
    """Cached tokens per layer of a `DynamicCache`."""
    out = []
    for layer in getattr(cache, "layers", None) or []:
        k = getattr(layer, "keys", None)
        out.append(int(k.shape[-2]) if isinstance(k, torch.Tensor) and k.dim() >= 2 else 0)
    return out




