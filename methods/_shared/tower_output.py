"""Shared machinery for visual-token reduction *at the vision tower's output* (VisionZip, VisPruner):
select (and merge) the tokens of LLaVA's feature layer once, then shrink the `<image>` placeholder run.

Three pieces, installed on one model instance (nothing global, no transformers fork):

1. **Feature-layer hook** (`patch_feature_layer`). The feature layer is the CLIP layer whose output LLaVA
   reads (`hidden_states[vision_feature_layer]`, -2: layer `num_layers - 2`, `adapter.last_useful_vision_layer`).
   Its `forward` (this instance only) runs unchanged, with its attention through the model's own interface
   (SDPA by default); forward hooks on its `q_proj` / `k_proj` keep the projections it computed anyway.
   After it, `reducer(h, q, k, n_keep)` turns the layer output h [B, N, D] (CLS at index 0) into the kept
   tokens [B, n_keep, D]; the layer returns `[h_CLS, kept...]`, so LLaVA's "default" feature strategy (drop
   index 0) hands exactly the kept tokens to the projector. Layers after the feature layer still run in HF,
   on the 1 + n_keep tokens; their output never reaches the LLM.

2. **The [CLS] attention row** (`cls_attention`): the one attention row a CLS-guided method needs,
   softmax(q_CLS · Kᵀ / √d_h) per head, from the layer's own q/k: B·H·N·d_h MACs (one matmul), instead of the
   full N x N attention maps the official code gets from `output_attentions=True` (which forces eager attention
   in every CLIP layer).

3. **Method plumbing** (`TowerOutputMethod`): a budget of `tokens` per image / crop or a per-prompt
   `prompt_tokens` (the budget rule of `VisionReductionMethod`: every crop of a prompt gets the same k, the
   one nearest the prompt's target), validation against the model, `apply` (placeholder shrinking and the
   LLaVA-NeXT packing `[crop tokens..., image_newline]` come from `vision_reduce.install_placeholder_shrink`),
   the visual-token counts and the analytic FLOPs: per CLIP pass patch embedding + the layers up to the
   feature layer over N tokens + the later layers over 1 + k + the method's own matmuls (`overhead_macs`);
   projector and LLM over the kept tokens.
"""
from __future__ import annotations

import functools

import torch

from methods._shared.vision_reduce import VisionGeometry, VisionReductionMethod, install_placeholder_shrink
from methods.base import Method, MethodError

_PATCHED = "_vtbench_tower_output"

#: why the CLS-guided tower-output methods refuse the families without a CLIP [CLS] token (one line each)
NO_CLS_REFUSALS = {
    "qwen2_vl": "its ViT has no [CLS] token, whose attention selects the tokens (the paper's signal); use an "
    "LLM-side method or divprune",
    "qwen2_5_vl": "its ViT has no [CLS] token, whose attention selects the tokens (the paper's signal); use an "
    "LLM-side method or divprune",
    "llava_onevision": "its SigLIP tower has no [CLS] token, whose attention selects the tokens (the paper's "
    "signal), and its anyres_max packing needs each image's full feature grid; use an LLM-side method or divprune",
}


# ---- the one attention row -------------------------------------------------------------------------
def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the [CLS] query (index 0) over all N keys, per head: [B, H, N] (float32).
    q, k: [B, H, N, d_h] of one CLIP layer (before the 1/√d_h scale). Cost B·H·N·d_h MACs."""
    scale = q.shape[-1] ** -0.5
    logits = torch.matmul(q[:, :, :1] * scale, k.transpose(-1, -2))  # [B, H, 1, N]
    return logits.float().softmax(dim=-1)[:, :, 0]


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d]."""
    B, N, _ = x.shape
    return x.view(B, N, -1, head_dim).transpose(1, 2)


# ---- the feature-layer hook ---------------------------------------------------------------------------
class FeatureReducer:
    """What a tower-output method does to the feature layer's output: `method.reduce(h, q, k, n_keep)`;
    `n_keep` is set per forward (a per-prompt budget) or fixed. With `track` on (asked-cell recall,
    harness/recall.py, through the vision-side holder) the method also leaves `last_share` [B, n_keep, P]:
    the share of each original patch in each kept token (rows sum to 1; a [CLS] token fed as a visual token
    has a zero row)."""

    def __init__(self, method, n_keep: int | None = None):
        self.method = method
        self.n_keep = n_keep

    def __call__(self, h, q, k, track: bool = False):
        self.method.last_share = None
        self.method.track_share = track
        return self.method.reduce(h, q, k, self.n_keep)


def patch_feature_layer(model, adapter, reducer: FeatureReducer) -> FeatureReducer:
    """Wrap the forward of this instance's feature layer so its output is `[CLS, reducer(h, q, k)...]`. The
    vision-side bookkeeping holder of `vision_reduce` (`last_vision_state`, its `track` switch) is installed too,
    so harness/recall.py reads what these methods kept exactly as it reads ToMe's merges."""
    from methods._shared.vision_reduce import _PATCHED as VISION_HOLDER, VisionState, _Holder

    if getattr(model, _PATCHED, None) is not None or getattr(model, VISION_HOLDER, None) is not None:
        raise MethodError("this model instance already has a vision-side token reduction applied")
    idx = adapter.last_useful_vision_layer
    layer = adapter.vision_layers[idx]
    attn = layer.self_attn
    seen: dict[str, torch.Tensor | None] = {"q": None, "k": None}
    holder = _Holder()

    def keep(which):
        def hook(module, inputs, output):
            seen[which] = output

        return hook

    attn.q_proj.register_forward_hook(keep("q"))
    attn.k_proj.register_forward_hook(keep("k"))
    original = layer.forward

    @functools.wraps(original)
    def forward(hidden_states, *args, **kwargs):
        out = original(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        q, k = seen["q"], seen["k"]
        seen["q"] = seen["k"] = None
        if reducer.n_keep is None or q is None or reducer.n_keep >= h.shape[1] - 1:
            return out
        kept = reducer(h, split_heads(q, attn.head_dim), split_heads(k, attn.head_dim), track=holder.track)
        B, N = h.shape[:2]
        n = kept.shape[1]
        state = VisionState(size=torch.ones(B, 1 + n, device=h.device), track=holder.track)
        share = getattr(reducer.method, "last_share", None)
        if holder.track and share is not None:  # [B, 1 + n, N]: CLS row, then the kept tokens' patch shares
            state.source = torch.zeros(B, 1 + n, N, device=h.device)
            state.source[:, 0, 0] = 1.0
            state.source[:, 1:, 1:] = share.float()
        holder.last = state
        h = torch.cat([h[:, :1], kept.to(h.dtype)], dim=1)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    layer.forward = forward
    object.__setattr__(model, _PATCHED, reducer)
    object.__setattr__(model, VISION_HOLDER, holder)
    return reducer


# ---- the Method plumbing --------------------------------------------------------------------------------
class TowerOutputMethod(Method):
    """Base of the methods that select / merge the feature layer's tokens (per image or crop) before the
    projector. Subclasses are dataclasses with the fields `tokens` (kept tokens per image / crop; None = no
    budget of this kind) and `prompt_tokens` (per-prompt budget), and implement

    * `reduce(h, q, k, n_keep) -> [B, n_keep, D]`: h [B, N, D] the feature layer's output (CLS first),
      q / k [B, H, N, d_h] its attention projections;
    * `check_keep(geom, n_keep)`: raise MethodError for a count it cannot produce;
    * `overhead_macs(vit, n_keep)`: MACs of its own matmuls per CLIP pass (what fvcore counts of `reduce`);
    * `fixed_keep(geom)`: the per-crop count without a per-prompt budget (default `tokens`; None = no-op).
    """

    refusals = NO_CLS_REFUSALS
    #: reads top-k of attention values but never leaves the device: runs on meta (shape-only) models
    meta_countable = True
    budget_tokens_param = "prompt_tokens"
    #: a FLOPs budget is solved over the tokens kept per image / crop (as for ToMe and FiCoCo-V)
    budget_param = "tokens"
    _geom: VisionGeometry | None = None
    _target_fn = None

    # the per-prompt budget rule of the vision-side methods (one rule: VisionReductionMethod's)
    per_prompt = VisionReductionMethod.per_prompt
    prompt_target = VisionReductionMethod.prompt_target
    crop_tokens = VisionReductionMethod.crop_tokens
    reduced_layout_counts = VisionReductionMethod.reduced_layout_counts  # with this class's keep_per_crop

    # -- subclass hooks
    def reduce(self, h, q, k, n_keep: int):
        raise NotImplementedError

    def check_keep(self, geom: VisionGeometry, n_keep: int) -> None:
        pass

    def overhead_macs(self, vit, n_keep: int) -> int:
        return 0

    def fixed_keep(self, geom: VisionGeometry) -> int | None:
        return self.tokens

    # -- checks
    def check_budget_fields(self) -> None:
        """`tokens` a whole count >= 1; `prompt_tokens` a share in (0, 1] or a whole count > 1; not both."""
        t, p = self.tokens, self.prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise MethodError(f"{self.name}: tokens must be an integer >= 1 (tokens kept per image / crop), got {t!r}")
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or p <= 0 or (p > 1 and int(p) != p):
                raise MethodError(f"{self.name}: prompt_tokens must be a share in (0, 1] or a whole count > 1, got {p!r}")
            if t is not None:
                raise MethodError(f"{self.name}: give either prompt_tokens or tokens, not both")

    def budget_token_params(self, value: float) -> dict:
        return {"prompt_tokens": int(value) if float(value) > 1 else float(value), "tokens": None}

    def budget_params(self, value) -> dict:
        return {"tokens": value, "prompt_tokens": None}

    def validate(self, adapter) -> None:
        super().validate(adapter)
        try:
            geom = VisionGeometry.from_adapter(adapter)
        except Exception as e:  # e.g. multi-layer vision features
            raise MethodError(f"method {self.name!r}: {e}") from None
        if not adapter.drops_cls:
            raise MethodError(
                f"method {self.name!r} needs LLaVA's 'default' vision feature strategy (the [CLS] token dropped "
                "before the projector)"
            )
        if geom.last_useful < 0 or geom.last_useful >= geom.num_layers:
            raise MethodError(f"method {self.name!r}: the vision feature layer is not one of the tower's layers")
        if self.per_prompt:
            self.check_keep(geom, self.crop_tokens(geom, geom.visual_per_crop, 1, 0))
        else:
            k = self.fixed_keep(geom)
            if k is not None:
                if k > geom.visual_per_crop:
                    raise MethodError(
                        f"{self.name}: {self.budget_label(k)} exceeds the {geom.visual_per_crop} visual tokens per image / crop"
                    )
                self.check_keep(geom, k)
        self._geom = geom

    def budget_label(self, k: int) -> str:
        return f"tokens={k}"

    def keep_per_crop(self, geom: VisionGeometry) -> int:
        """Tokens per crop of a fixed budget (all of them when there is none)."""
        k = self.fixed_keep(geom)
        return geom.visual_per_crop if k is None else int(k)

    # -- apply
    def apply(self, model, adapter):
        self.validate(adapter)
        geom = self._geom
        if not self.per_prompt:
            k = self.keep_per_crop(geom)
            if k >= geom.visual_per_crop:
                return model  # nothing removed: the model is left untouched (identical logits)
            patch_feature_layer(model, adapter, FeatureReducer(self, k))
            install_placeholder_shrink(model, adapter, k)
            return model
        reducer = patch_feature_layer(model, adapter, FeatureReducer(self, None))

        def per_crop(n_visual, crops, n_images):
            k = self.crop_tokens(geom, n_visual, crops, n_images)
            self.check_keep(geom, k)
            return k

        def set_tokens(k):
            reducer.n_keep = int(k)

        install_placeholder_shrink(model, adapter, per_crop, set_tokens)
        return model

    # -- counts
    def visual_tokens_kept(self, layout) -> int:
        geom = self._geom_or_default()
        if not self.per_prompt and self.keep_per_crop(geom) >= geom.visual_per_crop:
            return int(layout.visual)  # no-op: the processor's count (NeXT's unpadded packing) stays
        return self.reduced_layout_counts(layout, geom)[2]

    def _geom_or_default(self) -> VisionGeometry:
        if self._geom is None:
            raise MethodError(f"method {self.name!r}: call validate(adapter) first (the budget depends on the model)")
        return self._geom

    def visual_tokens_to_llm(self, n_visual: int) -> int:
        """LLaVA-1.5: `n_visual` a multiple of the per-image count; every image keeps the same count."""
        geom = self._geom_or_default()
        images = max(1, n_visual // geom.visual_per_crop)
        if self.per_prompt:
            return images * self.crop_tokens(geom, n_visual, images, images)
        return images * min(self.keep_per_crop(geom), geom.visual_per_crop)

    # -- FLOPs
    def vision_pass_macs(self, vit, geom: VisionGeometry, n_keep: int) -> int:
        """One CLIP pass: embedding, layers 0..feature layer over all N tokens, the method's matmuls, the
        later layers over 1 + n_keep tokens."""
        from harness.efficiency.analytic import vit_embed_macs, vit_layer_macs

        total = vit_embed_macs(vit)
        for layer in range(geom.num_layers):
            total += vit_layer_macs(vit, vit.tokens if layer <= geom.last_useful else 1 + n_keep)
        return total + self.overhead_macs(vit, n_keep)

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        from harness.efficiency.analytic import dense_prefill_macs, lm_head_macs, llm_prefill_macs, projector_macs

        geom = self._geom or VisionGeometry.from_shapes(shapes)
        if not self.per_prompt and self.keep_per_crop(geom) >= geom.visual_per_crop:
            return dense_prefill_macs(shapes, layout)  # apply() leaves the model untouched
        passes, projected, visual = self.reduced_layout_counts(layout, geom)
        k = projected // passes if passes else geom.visual_per_crop
        return {
            "vision": passes * self.vision_pass_macs(shapes.vit, geom, k),
            "projector": projector_macs(shapes.vit.hidden, shapes.llm.hidden, projected),
            "llm": llm_prefill_macs(shapes.llm, layout.text + visual),
            "lm_head": lm_head_macs(shapes.llm, 1),
        }


__all__ = ["FeatureReducer", "NO_CLS_REFUSALS", "TowerOutputMethod", "cls_attention", "patch_feature_layer", "split_heads"]
