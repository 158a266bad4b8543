"""Model adapters: where things live inside a Hugging Face multimodal model.

Methods talk to an adapter, never to transformers internals directly, so a new model family is one
adapter class here. An adapter wraps one loaded model *instance*; it does not copy or modify it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class NotApplicable(ValueError):
    """A method (or tool) cannot act on this model family."""


@dataclass
class ModelAdapter:
    """Common view of a LLaVA-style model (vision tower -> projector -> decoder-only LLM)."""

    model: nn.Module
    family: str = "llava"

    # ---- modules -------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def base(self) -> nn.Module:
        """The inner `LlavaModel` / `LlavaNextModel` (holds towers, projector, LLM)."""
        return self.model.model

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.vision_tower

    @property
    def vision_layers(self) -> nn.ModuleList:
        """The CLIP encoder layers (`CLIPEncoderLayer`), in order."""
        return self.vision_tower.encoder.layers

    @property
    def projector(self) -> nn.Module:
        return self.base.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.base.language_model

    @property
    def llm_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    # ---- geometry ------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_llm_layers(self) -> int:
        return len(self.llm_layers)

    @property
    def num_vision_layers(self) -> int:
        return len(self.vision_layers)

    @property
    def vision_feature_layer(self) -> int:
        """Index into CLIP `hidden_states` that feeds the projector (-2 for LLaVA)."""
        layer = self.model.config.vision_feature_layer
        if isinstance(layer, (list, tuple)):
            raise NotApplicable("multi-layer vision features are not supported")
        return int(layer)

    @property
    def last_useful_vision_layer(self) -> int:
        """0-based index of the last CLIP layer whose output reaches the LLM.

        `hidden_states[0]` is the embedding output, so `hidden_states[-2]` is the output of layer
        `num_layers - 2`; work done in later layers is wasted.
        """
        n = self.num_vision_layers
        idx = self.vision_feature_layer
        return (n + idx) if idx < 0 else idx - 1

    @property
    def patches_per_side(self) -> int:
        vc = self.vision_config
        return vc.image_size // vc.patch_size

    @property
    def vision_tokens_per_image(self) -> int:
        """Tokens per image (or per crop) in the CLIP encoder, CLS included."""
        return self.patches_per_side**2 + 1

    @property
    def drops_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "default"

    @property
    def visual_tokens_per_image(self) -> int:
        """Visual tokens one LLaVA-1.5 image (or one LLaVA-NeXT crop) contributes to the LLM."""
        return self.vision_tokens_per_image - (1 if self.drops_cls else 0)

    @property
    def sliding_window(self) -> int | None:
        """The language model's sliding-window size if any of its layers attends through one (Mistral's
        `sliding_window`; Qwen2 with `use_sliding_window`; any `layer_types` entry "sliding_attention"),
        else None."""
        tc = self.text_config
        window = getattr(tc, "sliding_window", None)
        if not window:
            return None
        types = getattr(tc, "layer_types", None)
        if types is not None and not any("sliding" in str(t) for t in types):
            return None
        return int(window)

    @property
    def position_streams(self) -> int:
        """Rotary position streams of the language model: 1 (RoPE), 3 (Qwen2-VL's M-RoPE: temporal,
        height, width)."""
        return 1

    # ---- masks ---------------------------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean [B, T] mask of visual-token positions, from `input_ids == image_token_id`."""
        return input_ids == self.image_token_id

    def describe(self) -> dict:
        tc, vc = self.text_config, self.vision_config
        return {
            "family": self.family,
            "llm_type": tc.model_type,
            "llm_layers": self.num_llm_layers,
            "llm_hidden": tc.hidden_size,
            "llm_heads": tc.num_attention_heads,
            "llm_kv_heads": getattr(tc, "num_key_value_heads", tc.num_attention_heads),
            "llm_intermediate": tc.intermediate_size,
            "vocab_size": tc.vocab_size,
            "vision_layers": self.num_vision_layers,
            "vision_hidden": vc.hidden_size,
            "vision_image_size": vc.image_size,
            "vision_patch_size": vc.patch_size,
            "visual_tokens_per_image": self.visual_tokens_per_image,
            "vision_feature_layer": self.vision_feature_layer,
        }


class LlavaAdapter(ModelAdapter):
    def __init__(self, model: nn.Module):
        super().__init__(model=model, family="llava")


class LlavaNextAdapter(ModelAdapter):
    """LLaVA-NeXT: anyres tiles (base crop + high-res crops) packed with `image_newline` tokens.

    The number of visual tokens per image depends on its size; `visual_tokens_per_image` is the
    count for one crop.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model=model, family="llava_next")


class LlavaOnevisionAdapter(ModelAdapter):
    """LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres packing (base crop + grid
    crops, unpadded, one `image_newline` per row) with up to 6x6 crops of 384 px, "anyres_max_9" (a grid of
    more than 9 x 729 features is bilinearly downsampled before the newlines), a SigLIP tower without CLS
    token whose last layer feeds the projector (`vision_feature_layer=-1`, strategy "full"), and a Qwen2
    decoder (1-D RoPE). `visual_tokens_per_image` is the count of one crop (729)."""

    def __init__(self, model: nn.Module):
        super().__init__(model=model, family="llava_onevision")

    @property
    def drops_cls(self) -> bool:
        return False

    @property
    def vision_tokens_per_image(self) -> int:
        return self.patches_per_side**2  # SigLIP: no CLS


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (same module layout; its ViT attends
    inside 112-pixel windows except in `fullatt_block_indexes`, with a gated MLP): a dynamic-resolution ViT that packs the patches of
    all images of a batch into one sequence (block-diagonal attention per image, 2-D rotary positions),
    a `PatchMerger` (LayerNorm + 2-layer MLP over each 2x2 patch group) as the projector, and a Qwen2
    decoder with biased q/k/v and M-RoPE: three position streams (temporal, height, width) that the
    model computes from `input_ids` and `image_grid_thw` (`get_rope_index`) and turns into one cos/sin
    pair per token before the layer loop, so per-layer slicing of cos/sin follows kept tokens exactly.

    Visual tokens per image = (h/28) x (w/28) after the processor's `smart_resize` to its pixel limits:
    the count depends on the image size. `visual_tokens_per_image` is the count of the reference image
    (`REFERENCE_IMAGE`, 448x448 -> 256 tokens at full size) that budgets are priced on.
    """

    #: (height, width) of the reference image budgets and `vtbench-flops` are priced on; a config may
    #: set `vtbench_reference_image` (the tiny builders do: their pixel limits are smaller)
    REFERENCE_IMAGE = (448, 448)

    def __init__(self, model: nn.Module):
        super().__init__(model=model, family=model.config.model_type)

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.visual

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    @property
    def projector(self) -> nn.Module:
        """The `PatchMerger` at the end of the ViT (Qwen2-VL has no separate projector)."""
        return self.vision_tower.merger

    @property
    def vision_rotary(self) -> nn.Module:
        """The ViT's 2-D rotary embedding (computes from `image_grid_thw` values)."""
        return self.vision_tower.rotary_pos_emb

    @property
    def merge_size(self) -> int:
        return int(self.vision_config.spatial_merge_size)

    @property
    def vision_feature_layer(self) -> int:
        return -1  # the merger reads the last block's output

    @property
    def last_useful_vision_layer(self) -> int:
        return self.num_vision_layers - 1

    @property
    def patches_per_side(self) -> int:
        raise NotApplicable(f"{self.family}: the patch grid depends on each image's size (dynamic resolution)")

    @property
    def drops_cls(self) -> bool:
        return False

    @property
    def reference_image(self) -> tuple[int, int]:
        return qwen_reference_image(self.config)

    @property
    def vision_tokens_per_image(self) -> int:
        """ViT patches of the reference image (no CLS)."""
        return qwen_visual_tokens(self.config) * self.merge_size**2

    @property
    def visual_tokens_per_image(self) -> int:
        """Visual tokens (merged 2x2 patch groups) of the reference image."""
        return qwen_visual_tokens(self.config)

    @property
    def position_streams(self) -> int:
        return 3

    def describe(self) -> dict:
        tc, vc = self.text_config, self.vision_config
        return {
            "family": self.family,
            "llm_type": tc.model_type,
            "llm_layers": self.num_llm_layers,
            "llm_hidden": tc.hidden_size,
            "llm_heads": tc.num_attention_heads,
            "llm_kv_heads": getattr(tc, "num_key_value_heads", tc.num_attention_heads),
            "llm_intermediate": tc.intermediate_size,
            "vocab_size": tc.vocab_size,
            "vision_layers": self.num_vision_layers,
            "vision_hidden": getattr(vc, "embed_dim", None) or vc.hidden_size,
            "vision_patch_size": vc.patch_size,
            "spatial_merge_size": vc.spatial_merge_size,
            "reference_image": list(self.reference_image),
            "visual_tokens_per_image": self.visual_tokens_per_image,
        }


def qwen_reference_image(config) -> tuple[int, int]:
    """(height, width) of the image budgets and `vtbench-flops` price a Qwen2-VL-style model on: the
    config's `vtbench_reference_image` if set (the tiny builders set it), else 448x448."""
    ref = getattr(config, "vtbench_reference_image", None)
    return tuple(int(x) for x in ref) if ref else Qwen2VLAdapter.REFERENCE_IMAGE


def qwen_visual_grid(config, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of merged visual tokens a Qwen2-VL processor gives an image of (height, width)
    (default: the reference image): `smart_resize` to multiples of patch x merge within the processor's
    default pixel limits (56x56 .. 28x28x1280), then one token per merge x merge patch group."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    factor = int(vc.patch_size) * int(vc.spatial_merge_size)
    h, w = image_hw or qwen_reference_image(config)
    rh, rw = smart_resize(int(h), int(w), factor=factor)
    return rh // factor, rw // factor


def qwen_visual_tokens(config, image_hw: tuple[int, int] | None = None) -> int:
    """Visual tokens of one image (see `qwen_visual_grid`)."""
    rows, cols = qwen_visual_grid(config, image_hw)
    return rows * cols


_ADAPTERS = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2VLAdapter,  # Qwen2.5-VL: the same layout (windowed ViT attention, gated ViT MLP)
}


#: model families with an adapter (`model.family` values)
FAMILIES = tuple(_ADAPTERS)


def family_of(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in _ADAPTERS:
        raise NotApplicable(
            f"model type {mt!r} is not supported (supported families: {', '.join(sorted(_ADAPTERS))})"
        )
    return mt


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a loaded model; raises `NotApplicable` for unknown families."""
    return _ADAPTERS[family_of(model.config)](model)
