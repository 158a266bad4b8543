"""Visual-token bookkeeping: where the visual tokens are in the current forward pass.

`install_context(model, adapter)` wraps the inner multimodal model's `forward` of this one instance
(idempotently) so that every call records, before the language model runs:

* `visual_mask` [B, T]: `input_ids == image_token_id` for the tokens of this call (never an offset
  like 35: the span is read from the ids, per sample, so padding and prompts of any length work);
* `attention_mask` as passed (2-D padding mask or None);
* `is_prefill`: True when no tokens are cached yet; `past_length` otherwise;
* `prompt_visual` [B]: the visual tokens of each prompt as the processor inserted them (all images,
  crops and LLaVA-NeXT newlines) — the count a token budget is a share of. It is the count in
  `input_ids`, unless a vision-side reduction shortened the placeholder runs before this call: that
  reduction announces the original counts with `announce_prompt_visual` and the next call takes them.

Methods acting inside the LLM read it through `get_context(model)`; `ctx.scratch` is cleared at every
call and holds per-forward method state (e.g. the kept indices chosen at a layer).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

_ATTR = "_vtbench_context"
_IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw")


@dataclass
class VisualContext:
    visual_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    is_prefill: bool = False
    past_length: int = 0
    scratch: dict[str, Any] = field(default_factory=dict)
    #: per-call log of visual tokens alive at the input of each LLM layer (prefill only), filled by
    #: methods that change it; read by the efficiency probe
    visual_tokens_per_layer: list[int] | None = None
    #: visual tokens alive after the last reduction of the current prefill (max over the samples, which
    #: agree): what the LLM's last layer works on; methods that reduce inside the LLM update it
    visual_tokens_final: int | None = None
    #: [B] visual tokens of each prompt before any vision-side reduction (see the module docstring)
    prompt_visual: torch.Tensor | None = None
    pending_prompt_visual: torch.Tensor | None = None
    #: references (no copies) to this call's `input_ids` and image inputs (`pixel_values`, `image_sizes`,
    #: `image_grid_thw`): what identifies each sample's document (`methods._shared.document`). A call
    #: given pre-encoded images (`mm_encoder_outputs`: `generate` encodes them once before the loop) takes
    #: the image inputs of the last `get_image_features` call, the one that encoded them
    inputs: dict[str, Any] = field(default_factory=dict)
    encoded_images: dict[str, Any] = field(default_factory=dict)


def _cache_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    try:
        return int(past_key_values.get_seq_length())
    except Exception:  # pragma: no cover - exotic caches
        return 0


def install_context(model, adapter) -> VisualContext:
    """Attach (once) and return the `VisualContext` of `model`."""
    ctx = getattr(model, _ATTR, None)
    if ctx is not None:
        return ctx
    ctx = VisualContext()
    base = adapter.base
    original = base.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        ctx.past_length = _cache_length(past)
        ctx.is_prefill = ctx.past_length == 0
        ctx.visual_mask = adapter.visual_mask(input_ids) if input_ids is not None else None
        pending, ctx.pending_prompt_visual = ctx.pending_prompt_visual, None
        if pending is not None:
            ctx.prompt_visual = pending
        elif ctx.visual_mask is not None and ctx.visual_mask.device.type != "meta":
            ctx.prompt_visual = ctx.visual_mask.sum(1)
        else:
            ctx.prompt_visual = None
        if ctx.is_prefill:
            known = ctx.visual_mask is not None and ctx.visual_mask.device.type != "meta"
            ctx.visual_tokens_final = int(ctx.visual_mask.sum(1).max()) if known and ctx.visual_mask.numel() else None
        ctx.attention_mask = kwargs.get("attention_mask")
        images = {k: kwargs.get(k) for k in _IMAGE_INPUTS}
        if images["pixel_values"] is None and kwargs.get("mm_encoder_outputs"):
            images = dict(ctx.encoded_images)
        ctx.inputs = {"input_ids": input_ids, **images}
        ctx.scratch = {}
        ctx.visual_tokens_per_layer = None
        return original(*args, **kwargs)

    base.forward = forward
    encode = getattr(base, "get_image_features", None)
    if encode is not None:
        sig = inspect.signature(encode)

        @functools.wraps(encode)
        def get_image_features(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs).arguments
            ctx.encoded_images = {k: bound.get(k) for k in _IMAGE_INPUTS}
            return encode(*args, **kwargs)

        base.get_image_features = get_image_features
    object.__setattr__(model, _ATTR, ctx)
    return ctx


def announce_prompt_visual(model, counts) -> None:
    """Tell the next forward of `model` the per-sample visual-token counts its prompts had before a
    vision-side reduction shortened them (`counts`: [B] ints)."""
    ctx = getattr(model, _ATTR, None)
    if ctx is not None:
        ctx.pending_prompt_visual = torch.as_tensor(counts, dtype=torch.long)


def get_context(model) -> VisualContext | None:
    return getattr(model, _ATTR, None)


@contextlib.contextmanager
def narrowed(ctx: VisualContext, index: torch.Tensor):
    """Within the block, `ctx` describes only the prefill tokens `index` [B, n] (ascending prefill
    indices of the tokens still alive after an LLM-side drop, `methods._shared.llm_reduce`):
    `visual_mask` and the 2-D `attention_mask` are gathered to them and `scratch` is a namespace of its
    own for that token set (shared by every layer that runs on the same set). A layer-wise method's
    reduced layer (`reduced_layer.patch_layer`) running inside it therefore acts on the kept tokens
    only: that is how a composition's layer-wise member sees a token-dropping member's reduction."""
    vm, am, scratch = ctx.visual_mask, ctx.attention_mask, ctx.scratch
    if vm is None:
        yield ctx
        return
    P = vm.shape[1]
    spaces = scratch.setdefault("_narrowed", [])
    sub = next((d for held, d in spaces if held is index), None)
    if sub is None:
        sub = {}
        spaces.append((index, sub))
    ctx.visual_mask = vm.gather(1, index)
    if am is not None and am.dim() == 2:
        ctx.attention_mask = am[:, -P:].gather(1, index)
    ctx.scratch = sub
    try:
        yield ctx
    finally:
        ctx.visual_mask, ctx.attention_mask, ctx.scratch = vm, am, scratch
