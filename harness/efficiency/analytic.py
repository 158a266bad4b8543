"""Analytic FLOPs: the one place where compute formulas live.

Counting rule (state it with every number): **FLOPs = 2 x multiply-accumulates (MACs)** of the matrix
products (linear layers, attention QK^T and AV, convolution). Element-wise work (norms, RoPE,
activations, softmax, residual adds) is not counted, matching what fvcore counts once its MAC count
is doubled and attention is added back. Causal masking is not halved: SDPA/eager compute the full
n_q x n_k score matrix.

The primitives below take token counts, so a method's formula is a composition of them (e.g. a
ShortV frozen layer = `llm_layer_macs(s, n_q=text, n_kv=all, n_o=text, n_ffn=text)`). Paper
conventions (FastV's `4nd^2+2n^2d+2ndm`, FiCoCo's LLM-only prefill with 60 text tokens, ShortV's 64 text
tokens) are built on the same primitives.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LLMShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp_matrices: int = 3  # SwiGLU: gate, up, down

    @classmethod
    def from_config(cls, tc) -> "LLMShape":
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return cls(
            hidden=tc.hidden_size,
            intermediate=tc.intermediate_size,
            layers=tc.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=tc.vocab_size,
        )


@dataclass(frozen=True)
class ViTShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    channels: int = 3
    #: MLP matrices (CLIP / Qwen2-VL: fc1, fc2; Qwen2.5-VL: gated gate, up, down)
    mlp_matrices: int = 2
    #: class tokens (CLIP: 1; SigLIP, LLaVA-OneVision's tower: 0)
    cls: int = 1

    @classmethod
    def from_config(cls, vc) -> "ViTShape":
        return cls(
            hidden=vc.hidden_size,
            intermediate=vc.intermediate_size,
            layers=vc.num_hidden_layers,
            heads=vc.num_attention_heads,
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            channels=getattr(vc, "num_channels", 3),
            cls=0 if getattr(vc, "model_type", "") == "siglip_vision_model" else 1,
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """Tokens per image in the encoder, CLS included (SigLIP has none)."""
        return self.patches + self.cls


def flops(macs: int) -> int:
    """FLOPs = 2 x MACs."""
    return 2 * int(macs)


# ---- language model ------------------------------------------------------------------------------
def llm_layer_macs(
    s: LLMShape,
    n_q: int,
    n_kv: int | None = None,
    n_k: int | None = None,
    n_o: int | None = None,
    n_ffn: int | None = None,
    ffn_channels: int | None = None,
    attn_pairs: int | None = None,
) -> int:
    """MACs of one decoder layer.

    n_q: tokens whose queries are computed; n_kv: tokens whose K/V are projected (default n_q);
    n_k: keys each query attends to (default n_kv, i.e. no cache); n_o: tokens through W_O (default
    n_q); n_ffn: tokens through the FFN (default n_o); ffn_channels: FFN width used for those tokens
    (default the full intermediate size); attn_pairs: explicit number of (query, key) pairs scored,
    overriding n_q * n_k (for custom attention patterns computed sparsely).
    """
    d, hd = s.hidden, s.head_dim
    n_kv = n_q if n_kv is None else n_kv
    n_k = n_kv if n_k is None else n_k
    n_o = n_q if n_o is None else n_o
    n_ffn = n_o if n_ffn is None else n_ffn
    m = s.intermediate if ffn_channels is None else ffn_channels
    pairs = n_q * n_k if attn_pairs is None else attn_pairs
    q = n_q * d * s.heads * hd
    kv = 2 * n_kv * d * s.kv_heads * hd
    attn = 2 * pairs * s.heads * hd  # QK^T and AV
    o = n_o * s.heads * hd * d
    ffn = s.mlp_matrices * n_ffn * d * m
    return q + kv + attn + o + ffn


def llm_prefill_macs(s: LLMShape, n: int) -> int:
    """Dense LLM prefill over n tokens (all layers)."""
    return s.layers * llm_layer_macs(s, n)


def llm_decode_macs(s: LLMShape, context: int) -> int:
    """One decoded token attending to `context` cached tokens plus itself (all layers)."""
    return s.layers * llm_layer_macs(s, n_q=1, n_kv=1, n_k=context + 1)


def lm_head_macs(s: LLMShape, n_logits: int) -> int:
    return n_logits * s.hidden * s.vocab


# ---- vision tower and projector --------------------------------------------------------------------
def vit_layer_macs(v: ViTShape, n: int, n_out: int | None = None) -> int:
    """MACs of one CLIP encoder layer over n tokens; MLP over n_out tokens (after a merge)."""
    d = v.hidden
    n_out = n if n_out is None else n_out
    return 4 * n * d * d + 2 * n * n * d + v.mlp_matrices * n_out * d * v.intermediate


def vit_embed_macs(v: ViTShape) -> int:
    """Patch-embedding convolution."""
    return v.patches * v.channels * v.patch_size**2 * v.hidden


def vit_macs(v: ViTShape, layers_run: int | None = None) -> int:
    """Dense vision tower: embedding + `layers_run` layers (default all; HF runs all of them)."""
    L = v.layers if layers_run is None else layers_run
    return vit_embed_macs(v) + L * vit_layer_macs(v, v.tokens)


def vit_resized_macs(v: ViTShape, patches: int, layers_run: int | None = None) -> int:
    """The vision tower run on an image resized to `patches` patches (position embeddings interpolated to
    the smaller grid, `downsample`): patch embedding of those patches + `layers_run` layers over
    `patches` + CLS tokens. `vit_macs` is the case `patches = v.patches`."""
    L = v.layers if layers_run is None else layers_run
    return patches * v.channels * v.patch_size**2 * v.hidden + L * vit_layer_macs(v, patches + v.cls)


def projector_macs(vision_hidden: int, text_hidden: int, n_tokens: int) -> int:
    """LLaVA's 2-layer MLP projector."""
    return n_tokens * (vision_hidden * text_hidden + text_hidden * text_hidden)


# ---- whole-model prefill, by component -------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """Token counts of one prompt (batch 1): text before the first visual token, the visual tokens,
    text between the first and the last visual token (several images), text after the last one.

    `visual` counts the visual tokens as the processor inserts them (all images, all crops, LLaVA-NeXT's
    newline tokens included; methods compute their own reduced counts from it). `images` is the number
    of vision-encoder passes (LLaVA-1.5: images; LLaVA-NeXT: crops of all images), `n_images` the
    number of images (each LLaVA-NeXT image closes with one `image_newline` in the reduced packing).
    `between > 0` means the visual tokens form more than one span.
    """

    before: int
    visual: int
    after: int
    images: int = 1
    between: int = 0
    n_images: int = 1
    #: visual tokens of each image, in order (dynamic-resolution families, e.g. Qwen2-VL, whose vision
    #: cost depends on each image's size); empty: `visual` split evenly over `n_images`
    image_visual: tuple[int, ...] = ()
    #: (rows, cols) of merged visual tokens of each image (Qwen2.5-VL's windowed attention needs the grid);
    #: empty: each image taken as one window-free block
    image_grids: tuple[tuple[int, int], ...] = ()

    @property
    def total(self) -> int:
        return self.before + self.visual + self.between + self.after

    @property
    def text(self) -> int:
        return self.before + self.between + self.after

    @property
    def contiguous(self) -> bool:
        """The visual tokens form one span."""
        return self.between == 0

    def with_visual(self, visual: int) -> "TokenLayout":
        """The same prompt with `visual` visual tokens (text unchanged)."""
        import dataclasses

        return dataclasses.replace(self, visual=visual)


@dataclass(frozen=True)
class ModelShapes:
    llm: LLMShape
    vit: ViTShape
    #: CLIP layers HF actually runs (all of them, even past `vision_feature_layer`)
    vit_layers_run: int
    #: "llava" (CLIP tower + 2-layer MLP projector per visual token) or "qwen2_vl" (packed ViT over each
    #: image's patches, block-diagonal attention per image, then a merger over `merge`^2-patch groups)
    family: str = "llava"
    merge: int = 1
    temporal_patch: int = 1
    #: Qwen2.5-VL: window side in merged tokens (window_size / merge / patch) and the blocks that attend
    #: over the whole image (the others attend inside windows)
    window: int = 0
    full_blocks: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config) -> "ModelShapes":
        mt = getattr(config, "model_type", None)
        if mt in QWEN_VL_FAMILIES:
            vc = config.vision_config
            llm = LLMShape.from_config(config.text_config)
            common = dict(heads=vc.num_heads, image_size=0, patch_size=vc.patch_size, layers=vc.depth,
                          channels=getattr(vc, "in_channels", 3))
            if mt == "qwen2_5_vl":
                vit = ViTShape(hidden=vc.hidden_size, intermediate=vc.intermediate_size, mlp_matrices=3, **common)
                window = vc.window_size // vc.spatial_merge_size // vc.patch_size
                return cls(llm=llm, vit=vit, vit_layers_run=vit.layers, family=mt, merge=vc.spatial_merge_size,
                           temporal_patch=vc.temporal_patch_size, window=window,
                           full_blocks=tuple(vc.fullatt_block_indexes))
            vit = ViTShape(hidden=vc.embed_dim, intermediate=int(vc.embed_dim * vc.mlp_ratio), **common)
            return cls(llm=llm, vit=vit, vit_layers_run=vit.layers, family=mt, merge=vc.spatial_merge_size,
                       temporal_patch=vc.temporal_patch_size)
        vit = ViTShape.from_config(config.vision_config)
        return cls(llm=LLMShape.from_config(config.text_config), vit=vit, vit_layers_run=vit.layers)


#: dynamic-resolution families whose vision cost follows each image's patch count
QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def per_image_visual(layout: TokenLayout) -> list[int]:
    """Visual tokens of each image of `layout` (given, or `visual` split evenly over its images)."""
    if layout.image_visual:
        return list(layout.image_visual)
    n = max(1, layout.n_images)
    return [layout.visual // n] * n


def window_sizes(rows: int, cols: int, window: int) -> list[int]:
    """Merged tokens of each attention window of a rows x cols grid cut into window x window tiles
    (Qwen2.5-VL: the last row/column of tiles is partial)."""
    def cuts(n):
        return [min(window, n - a) for a in range(0, n, window)]

    return [h * w for h in cuts(rows) for w in cuts(cols)]


def packed_vit_macs(shapes: ModelShapes, layout: TokenLayout) -> int:
    """Qwen2-VL / Qwen2.5-VL's ViT: per image of v merged tokens, `merge`^2 * v patches (one temporal
    patch: an image is its frame repeated `temporal_patch` times); patch embedding (Conv3d over
    `temporal_patch` x p x p x channels), then every block with attention inside the image only
    (block-diagonal over the pack); Qwen2.5-VL's windowed blocks attend inside window x window tiles
    of merged tokens (`layout.image_grids`), its `full_blocks` over the whole image."""
    v = shapes.vit
    d, unit = v.hidden, shapes.merge**2
    total = 0
    grids = list(layout.image_grids) or [None] * len(per_image_visual(layout))
    for n_vis, grid in zip(per_image_visual(layout), grids):
        patches = n_vis * unit
        total += patches * v.channels * shapes.temporal_patch * v.patch_size**2 * d
        dense = vit_layer_macs(v, patches)
        if shapes.window and grid is not None:
            pairs = sum((w * unit) ** 2 for w in window_sizes(grid[0], grid[1], shapes.window))
            windowed = dense - 2 * patches * patches * d + 2 * pairs * d
            n_full = sum(1 for i in range(shapes.vit_layers_run) if i in shapes.full_blocks)
            total += n_full * dense + (shapes.vit_layers_run - n_full) * windowed
        else:
            total += shapes.vit_layers_run * dense
    return total


def merger_macs(shapes: ModelShapes, n_tokens: int) -> int:
    """Qwen2-VL's `PatchMerger`: per merged token, Linear(m^2 e -> m^2 e) then Linear(m^2 e -> LLM hidden)."""
    wide = shapes.vit.hidden * shapes.merge**2
    return n_tokens * (wide * wide + wide * shapes.llm.hidden)


def dense_prefill_macs(shapes: ModelShapes, layout: TokenLayout, n_logits: int = 1) -> dict[str, int]:
    """MACs of an unmodified model's prefill, per component (lm_head over `n_logits` positions)."""
    if shapes.family in QWEN_VL_FAMILIES:
        return {
            "vision": packed_vit_macs(shapes, layout),
            "projector": merger_macs(shapes, layout.visual),
            "llm": llm_prefill_macs(shapes.llm, layout.total),
            "lm_head": lm_head_macs(shapes.llm, n_logits),
        }
    return {
        "vision": layout.images * vit_macs(shapes.vit, shapes.vit_layers_run),
        "projector": projector_macs(shapes.vit.hidden, shapes.llm.hidden, layout.visual),
        "llm": llm_prefill_macs(shapes.llm, layout.total),
        "lm_head": lm_head_macs(shapes.llm, n_logits),
    }


def scheduled_prefill_macs(shapes: ModelShapes, layout: TokenLayout, schedule) -> dict[str, int]:
    """Prefill MACs of a method that removes visual tokens inside the LLM (or at its input): the dense
    vision tower, projector and LM head, and each decoder layer on the visual tokens alive at its input, plus
    the method's own selection MACs; `schedule` is `Method.llm_visual_schedule` (None: the dense model)."""
    macs = dense_prefill_macs(shapes, layout)
    if schedule is not None:
        per_layer, selection = schedule
        macs["llm"] = sum(llm_layer_macs(shapes.llm, layout.with_visual(v).total) for v in per_layer) + selection
    return macs
