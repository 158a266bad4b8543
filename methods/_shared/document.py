"""What identifies "the document" of each sample inside a model forward: a digest of the sample's own input.

A per-sample random choice (`random` with `per_sample=true`) must be the same for a sample wherever it
is computed: alone or inside a left-padded batch, at the prefill of a cached generation or in every
uncached forward over prompt + generated tokens, in the lmms-eval wrapper or in a direct call (tests, the
efficiency probe). The document is therefore defined by what the model receives for that sample, exactly
(integers and the processor's pixel tensors, never activations, whose last bits can depend on the batch):

* its **prompt token ids**: the valid (non-padding) ids of the prompt columns. The prompt ends where
  the reducer's scoring takes it to end (`ReduceState.pinned_prompt` / `pinned_suffix`, see
  `llm_reduce.pin_prompt_length` and `continuation`), so generated or continuation tokens never enter;
* its **images' pixel values** as the processor made them: one image per run of visual tokens in the
  sample's ids, taken in order from the batch's `pixel_values` (LLaVA: `[images, C, H, W]`; LLaVA-NeXT /
  OneVision: `[images, crops, C, H, W]`, trailing all-zero crops being the batch's crop padding;
  Qwen2-VL: the packed patch rows, `t*h*w` per image from `image_grid_thw`). Where the images cannot be
  assigned to samples this way (a count that does not match), only the ids are used.

Two samples with the same prompt and the same image are the same input and get the same choice; a
change of prompt template or image preprocessing is a different input. The digest is SHA-256 over a
version tag, the given seed and these bytes (pixels as float32, so the dtype the model runs in does not
enter).
"""
from __future__ import annotations

import hashlib

import torch

_TAG = b"vtbench-document-v1"


def _runs(mask_row: torch.Tensor) -> int:
    """Number of contiguous runs of True in a 1-D bool tensor (one per image)."""
    m = mask_row.long()
    return int(m[0]) + int((m[1:] > m[:-1]).sum()) if m.numel() else 0


def _images_per_sample(ctx, B: int, visual: torch.Tensor) -> list[list[torch.Tensor]] | None:
    """Each sample's image tensors (in order), or None where they cannot be assigned exactly."""
    pv = ctx.inputs.get("pixel_values")
    if pv is None or not torch.is_tensor(pv) or pv.device.type == "meta":
        return None
    counts = [_runs(visual[b]) for b in range(B)]
    grid = ctx.inputs.get("image_grid_thw")
    images: list[torch.Tensor] = []
    if grid is not None:  # packed patch rows (Qwen2-VL family)
        rows = [int(t) * int(h) * int(w) for t, h, w in grid.tolist()]
        if sum(rows) != pv.shape[0]:
            return None
        images = list(torch.split(pv, rows, dim=0))
    else:
        images = list(pv.unbind(0))
        if pv.dim() == 5:  # crops: drop the batch's all-zero padding crops at the end of each image
            images = [_strip_zero_crops(x) for x in images]
    if sum(counts) != len(images):
        return None
    out, i = [], 0
    for c in counts:
        out.append(images[i:i + c])
        i += c
    return out


def _strip_zero_crops(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    while n > 1 and not bool(x[n - 1].any()):
        n -= 1
    return x[:n]


def document_seeds(view, seed: int) -> list[int]:
    """Per sample of the prefill `view` (an `llm_reduce.LayerView`): a 64-bit integer derived from
    `seed` and the sample's document (see the module docstring)."""
    st, ctx = view.state, view.ctx
    ids = ctx.inputs.get("input_ids") if ctx is not None else None
    B, P = st.valid.shape
    if ids is None or ids.shape != (B, P):
        from methods.base import MethodError

        raise MethodError("a per-sample choice needs this forward's input_ids (called with inputs_embeds?)")
    if st.pinned_suffix:
        end = P - st.pinned_suffix
    elif st.pinned_prompt is not None:
        end = min(int(st.pinned_prompt), P)
    else:
        end = P
    ids, valid, visual = ids[:, :end].cpu(), st.valid[:, :end].cpu(), st.visual[:, :end].cpu()
    images = _images_per_sample(ctx, B, visual)
    out = []
    for b in range(B):
        h = hashlib.sha256(_TAG)
        h.update(int(seed).to_bytes(8, "little"))
        tok = ids[b][valid[b]].to(torch.int64).contiguous()
        h.update(len(tok).to_bytes(8, "little") + tok.numpy().tobytes())
        for img in (images[b] if images is not None else []):
            x = img.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(x.shape)).encode() + x.numpy().tobytes())
        out.append(int.from_bytes(h.digest()[:8], "little"))
    return out
