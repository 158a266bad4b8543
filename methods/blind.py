"""`blind` — no visual token reaches the LLM (a control: what a benchmark asks that the text alone answers).

MMTok (arXiv 2508.18264, Table 4) finds that LLaVA-1.5 keeps about 91 % of its ScienceQA and 92 % of its
MMMU score with 0 visual tokens; a method that looks lossless on such a benchmark may be dropping
everything. `blind` runs every prompt with its image removed:

* every image placeholder token (LLaVA-NeXT / OneVision: the crops' tokens and the `image_newline` ones;
  Qwen2-VL: the `<|image_pad|>` run) is cut from `input_ids` before the model runs, per sample (left
  padding rebuilt; `attention_mask`, `mm_token_type_ids` cut alike); the chat template's other text
  (Qwen's `<|vision_start|>` / `<|vision_end|>` markers, LLaVA's newline after `<image>`) stays;
* the image inputs (`pixel_values`, `image_sizes`, `image_grid_thw`, precomputed features) are dropped, so
  the vision tower and the projector never run;
* the LLM sees the remaining text with contiguous positions (1-D RoPE; Qwen's M-RoPE of a text-only
  prompt, three equal streams) — the prompt as if it had no image, as MMTok's 0-token setting.

`generate` returns the caller's prompt ids followed by the new tokens (`out[:, prompt_len:]` works); a
direct `forward` returns logits over the shortened sequence.

No parameters and no budget: `budget.kind` is refused (one line) — blind keeps 0 visual tokens whatever
the budget. FLOPs (MACs): vision 0, projector 0, LLM over the text tokens, lm_head.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch

from methods import register
from methods.base import LLM_SIDE_FAMILIES, Method

#: model inputs that carry images: dropped, so the vision tower does not run
IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_encoder_outputs", "batch_num_images",
                "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
#: per-token inputs cut like `input_ids`
TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


def strip_image_tokens(input_ids, attention_mask, image_token_id: int, pad_token_id: int, per_token=()):
    """Remove every `image_token_id` from each sample (and its padding), re-left-pad to the longest
    sample. Returns `(ids, mask, per_token)`; `per_token` tensors [B, T] are cut alike. The mask is None
    only if it was None and every sample keeps the same length."""
    B, T = input_ids.shape
    keep = input_ids != image_token_id
    if attention_mask is not None:
        keep &= attention_mask.bool()
    lengths = keep.sum(1)
    L = int(lengths.max()) if B else 0
    ids = torch.full((B, L), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((B, L), dtype=(attention_mask.dtype if attention_mask is not None else torch.long),
                       device=input_ids.device)
    cut = [torch.zeros((B, L), dtype=t.dtype, device=t.device) for t in per_token]
    for b in range(B):
        n = int(lengths[b])
        ids[b, L - n:] = input_ids[b][keep[b]]
        mask[b, L - n:] = 1
        for src, dst in zip(per_token, cut):
            dst[b, L - n:] = src[b][keep[b]]
    if attention_mask is None and bool((lengths == L).all()):
        mask = None
    return ids, mask, cut


@register
@dataclasses.dataclass
class Blind(Method):
    name = "blind"
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the image tokens from input_ids values
    #: no parameter setting keeps the image
    noop: ClassVar[dict | None] = None
    example: ClassVar[dict | None] = {}
    no_budget: ClassVar[str | None] = "it keeps no visual token whatever the budget"

    def visual_tokens_to_llm(self, n_visual: int) -> int:
        return 0

    def visual_tokens_kept(self, layout) -> int:
        return 0

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        from harness.efficiency.analytic import lm_head_macs, llm_prefill_macs

        return {"vision": 0, "projector": 0, "llm": llm_prefill_macs(shapes.llm, layout.text),
                "lm_head": lm_head_macs(shapes.llm, 1)}

    def apply(self, model, adapter):
        from methods._shared.context import announce_prompt_visual, install_context
        from methods._shared.vision_reduce import _as_kwargs

        from methods._shared.grid import content_holder, record_content

        self.validate(adapter)
        ctx = install_context(model, adapter)
        holder = content_holder(model)  # asked-cell recall (harness/recall.py): no content reaches the LLM
        image_token_id = adapter.image_token_id
        pad = adapter.text_config.pad_token_id
        pad = getattr(adapter.config, "pad_token_id", None) if pad is None else pad
        pad = 0 if pad is None else int(pad)

        def strip(kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in IMAGE_INPUTS}
            ids = kwargs.get("input_ids")
            if ids is None or not bool((ids == image_token_id).any()):
                return kwargs, False
            announce_prompt_visual(model, (ids == image_token_id).sum(1).cpu())
            if holder.track and adapter.family == "llava":
                record_content(holder, torch.zeros(0, adapter.visual_tokens_per_image), int(ids.shape[0]))
            names = [k for k in TOKEN_INPUTS if kwargs.get(k) is not None]
            new_ids, mask, cut = strip_image_tokens(ids, kwargs.get("attention_mask"), image_token_id, pad,
                                                    [kwargs[k] for k in names])
            kwargs = dict(kwargs, input_ids=new_ids, **dict(zip(names, cut)))
            if mask is not None:
                kwargs["attention_mask"] = mask
            pos = kwargs.get("position_ids")
            if pos is not None:  # contiguous positions of the remaining text (M-RoPE: three equal streams)
                m = mask if mask is not None else torch.ones_like(new_ids)
                flat = (m.long().cumsum(-1) - 1).clamp(min=0)
                kwargs["position_ids"] = flat if pos.dim() == 2 else flat[None].expand(pos.shape[0], -1, -1)
            if kwargs.get("labels") is not None:
                raise ValueError("`labels` cannot be combined with blind")
            return kwargs, True

        original_forward, original_generate = model.forward, model.generate

        @functools.wraps(original_forward)
        def forward(*args, **kwargs):
            kwargs, _ = strip(_as_kwargs(original_forward, args, kwargs))
            return original_forward(**kwargs)

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            kwargs = _as_kwargs(original_generate, args, kwargs)
            if isinstance(kwargs.get("inputs"), torch.Tensor) and "input_ids" not in kwargs:
                kwargs["input_ids"] = kwargs.pop("inputs")
            orig_ids = kwargs.get("input_ids")
            kwargs, changed = strip(kwargs)
            out = original_generate(**kwargs)
            if not changed:
                return out
            t_short = kwargs["input_ids"].shape[1]
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            seqs = torch.cat([orig_ids.to(seqs.device), seqs[:, t_short:]], dim=1)
            if isinstance(out, torch.Tensor):
                return seqs
            out.sequences = seqs
            return out

        model.forward, model.generate = forward, generate

        def log_visual(module, args, kwargs):  # the efficiency probe's per-layer count: none
            if ctx.is_prefill:
                ctx.visual_tokens_per_layer = [0] * adapter.num_llm_layers

        adapter.language_model.register_forward_pre_hook(log_visual, with_kwargs=True)
        return model
