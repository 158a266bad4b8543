"""The analytic side of the FLOPs counter: the formulas a token layout gives per component
(`analytic_prefill`, `analytic_decode`: MACs of `harness.efficiency.analytic`, doubled) and synthetic
prompts of full-size architectures without a processor (`synthetic_inputs`, `synthetic_layout`).
The counter itself (fvcore, FlopCounterMode) is `harness.efficiency.flops`, which re-exports these."""
from __future__ import annotations

import torch

from harness.efficiency import analytic as A

#: anyres families (base crop + grid crops, unpadded, one newline per row): LLaVA-NeXT, LLaVA-OneVision
ANYRES = ("llava_next", "llava_onevision")


def num_crops(config, image_size) -> int:
    """Vision-encoder passes for one image: 1 (LLaVA-1.5) or LLaVA-NeXT's base + grid crops."""
    if getattr(config, "model_type", None) not in ANYRES:
        return 1
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(
        image_size_to_num_patches(
            image_size=image_size,
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )
    )


def projected_tokens(config, layout: A.TokenLayout) -> int:
    """Tokens through the projector: LLaVA-1.5 projects the visual tokens it inserts; LLaVA-NeXT
    projects every crop's patch tokens (before unpadding and newline tokens)."""
    if getattr(config, "model_type", None) in ANYRES:
        vc = config.vision_config
        per_crop = (vc.image_size // vc.patch_size) ** 2
        if config.vision_feature_select_strategy != "default":
            per_crop += _cls(config)
        return layout.images * per_crop
    return layout.visual


def analytic_prefill(config, layout: A.TokenLayout, method=None, n_logits: int = 1) -> dict[str, int]:
    """Analytic prefill FLOPs (= 2 x MACs) per component for one sample: the method's
    `analytic_prefill_macs` (dense if none), with LLaVA-NeXT's projector count fixed up."""
    shapes = A.ModelShapes.from_config(config)
    if method is None:
        macs = A.dense_prefill_macs(shapes, layout, n_logits=n_logits)
    else:
        macs = dict(method.analytic_prefill_macs(shapes, layout))
    if getattr(config, "model_type", None) in ANYRES:
        dense_proj = A.projector_macs(shapes.vit.hidden, shapes.llm.hidden, layout.visual)
        if macs.get("projector") == dense_proj:
            macs["projector"] = A.projector_macs(
                shapes.vit.hidden, shapes.llm.hidden, projected_tokens(config, layout)
            )
    return {k: 2 * int(v) for k, v in macs.items()}


def analytic_decode(config, context: int, n_logits: int = 1, kv_lengths: list[int] | None = None) -> dict[str, int]:
    """Analytic FLOPs of one decode step attending to `context` cached tokens + itself in every layer,
    or, with `kv_lengths`, to each layer's own cache length + itself (a method that pruned the cache)."""
    s = A.LLMShape.from_config(config.text_config)
    if kv_lengths:
        if len(kv_lengths) != s.layers:
            raise ValueError(f"kv_lengths has {len(kv_lengths)} entries for {s.layers} layers")
        llm = sum(A.llm_layer_macs(s, n_q=1, n_kv=1, n_k=n + 1) for n in kv_lengths)
    else:
        llm = A.llm_decode_macs(s, context)
    return {
        "vision": 0,
        "projector": 0,
        "llm": 2 * llm,
        "lm_head": 2 * A.lm_head_macs(s, n_logits),
    }


def visual_tokens_for_image(config, image_hw: tuple[int, int] | None = None) -> int:
    """Image tokens the processor inserts for one image of size (height, width).

    LLaVA-1.5: patches per crop (CLS dropped with the "default" strategy). LLaVA-NeXT (anyres): the
    base crop's patches plus the high-resolution grid's patches after removing the rows/columns that
    correspond to letterbox padding, plus one newline token per remaining row.
    """
    if getattr(config, "model_type", None) in A.QWEN_VL_FAMILIES:
        from harness.models.adapter import qwen_visual_tokens

        return qwen_visual_tokens(config, image_hw)
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    cls = 0 if config.vision_feature_select_strategy == "default" else _cls(config)
    base = side * side + cls
    if getattr(config, "model_type", None) not in ANYRES:
        return base
    from transformers.image_processing_utils import select_best_resolution

    h, w = image_hw or (vc.image_size, vc.image_size)
    best_h, best_w = select_best_resolution([h, w], config.image_grid_pinpoints)
    cur_h = side * (best_h // vc.image_size)
    cur_w = side * (best_w // vc.image_size)
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(w * (cur_h / h), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    aspect = getattr(config, "vision_aspect_ratio", None)
    if getattr(config, "model_type", None) == "llava_onevision" and aspect and aspect.startswith("anyres_max_"):
        # OneVision downsamples (bilinear) a grid of more than max x side^2 features by `ratio` per side
        import math

        ratio = math.sqrt(cur_h * cur_w / (int(aspect.removeprefix("anyres_max_")) * side * side))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return base + cur_h * cur_w + cur_h


def _cls(config) -> int:
    """Class tokens of the vision tower: CLIP 1, SigLIP 0."""
    return 0 if getattr(config.vision_config, "model_type", "") == "siglip_vision_model" else 1


def default_image_hw(config) -> tuple[int, int]:
    """The probe image size of the `full` convention: one crop for LLaVA-1.5; for LLaVA-NeXT the
    largest square pinpoint (672x672 for the llava-hf checkpoints: base + 2x2 crops)."""
    vc = config.vision_config
    if getattr(config, "model_type", None) in A.QWEN_VL_FAMILIES:
        from harness.models.adapter import qwen_reference_image

        return qwen_reference_image(config)
    if getattr(config, "model_type", None) not in ANYRES:
        return (vc.image_size, vc.image_size)
    if getattr(config, "model_type", None) == "llava_onevision":
        return (2 * vc.image_size, 2 * vc.image_size)  # 768x768: base + 2x2 crops (the 2304x2304 pinpoint has 37)
    squares = [tuple(p) for p in config.image_grid_pinpoints if p[0] == p[1]]
    return max(squares) if squares else tuple(config.image_grid_pinpoints[0])


def synthetic_inputs(
    config, *, text_before: int = 1, text_after: int = 63, image_hw: tuple[int, int] | None = None,
    batch_size: int = 1, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Model inputs with the processor's layout (`text_before` ids, the image tokens, `text_after`
    ids) for counting without a processor, e.g. on the meta device. Token ids are placeholders (the
    count does not depend on them); `image_sizes` stays on the CPU (LLaVA-NeXT reads its values)."""
    image_hw = tuple(image_hw or default_image_hw(config))
    n_img = visual_tokens_for_image(config, image_hw)
    img_id = int(config.image_token_id)
    other = 1 if img_id != 1 else 2
    ids = torch.full((batch_size, text_before + n_img + text_after), other, dtype=torch.long)
    ids[:, text_before : text_before + n_img] = img_id
    vc = config.vision_config
    if getattr(config, "model_type", None) in A.QWEN_VL_FAMILIES:
        # one image of n_img merged tokens: (merge * rows) x (merge * cols) patches, one temporal patch; the
        # grid stays on the CPU (the ViT reads its values); 3-D positions are given (on meta the model could
        # not compute them from the ids), all streams 0..T-1 (the count does not depend on them)
        from harness.models.adapter import qwen_visual_grid

        rows, cols = qwen_visual_grid(config, image_hw)
        m = vc.spatial_merge_size
        patch_dim = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size**2
        out = {"input_ids": ids.to(device)}
        if torch.device(device).type != "meta":
            out["attention_mask"] = torch.ones_like(ids).to(device)
        out["pixel_values"] = torch.zeros((batch_size * rows * cols * m * m, patch_dim), dtype=dtype, device=device)
        out["image_grid_thw"] = torch.tensor([[1, rows * m, cols * m]] * batch_size, dtype=torch.long)
        out["position_ids"] = torch.arange(ids.shape[1], device=device).view(1, 1, -1).expand(3, batch_size, -1)
        return out
    crops = num_crops(config, list(image_hw))
    shape = (batch_size, vc.num_channels if hasattr(vc, "num_channels") else 3, vc.image_size, vc.image_size)
    out: dict[str, torch.Tensor] = {"input_ids": ids.to(device)}
    if torch.device(device).type != "meta":  # on meta a mask would trigger data-dependent checks
        out["attention_mask"] = torch.ones_like(ids).to(device)
    if getattr(config, "model_type", None) in ANYRES:
        out["pixel_values"] = torch.zeros((batch_size, crops, *shape[1:]), dtype=dtype, device=device)
        out["image_sizes"] = torch.tensor([list(image_hw)] * batch_size, dtype=torch.long)
    else:
        out["pixel_values"] = torch.zeros(shape, dtype=dtype, device=device)
    return out


def synthetic_layout(
    config, *, text_before: int = 1, text_after: int = 63, image_hw: tuple[int, int] | None = None
) -> A.TokenLayout:
    """The `TokenLayout` of `synthetic_inputs(config, ...)` with the same arguments."""
    image_hw = tuple(image_hw or default_image_hw(config))
    if getattr(config, "model_type", None) in A.QWEN_VL_FAMILIES:
        from harness.models.adapter import qwen_visual_grid

        rows, cols = qwen_visual_grid(config, image_hw)
        return A.TokenLayout(before=text_before, visual=rows * cols, after=text_after, images=1,
                             image_visual=(rows * cols,), image_grids=((rows, cols),))
    return A.TokenLayout(
        before=text_before,
        visual=visual_tokens_for_image(config, image_hw),
        after=text_after,
        images=num_crops(config, list(image_hw)),
    )
