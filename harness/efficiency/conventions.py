"""FLOPs conventions of the papers, and ours, in one place (built on `harness.efficiency.analytic`).

Absolute FLOPs are not comparable across papers: each counts different parts of the model with a
different synthetic prompt. Every function returns FLOPs (2 x MACs) unless stated otherwise.

* **full** (ours): every component (vision tower with all the CLIP layers Hugging Face runs, projector,
  LLM prefill, lm_head for the last position), the exact token counts of the input; FLOPs = 2 x MACs.
* **shortv** (ShortV, Yuan et al. 2025, Tables 1-2): LLM prefill only, `t = 64` text tokens, `v = 576`
  visual tokens (LLaVA-1.5) or `v = 2880 = 5 x 576` (LLaVA-NeXT, newline tokens ignored); full T^2
  attention (QK^T and AV), SwiGLU FFN with 3 matrices, 2 FLOPs per MAC. Reproduces 8.50 / 16.58 / 42.67 /
  81.81 TFLOPs (1.5-7B / 1.5-13B / NeXT-7B / NeXT-13B; printed 8.5 / 16.6 / 42.7 / 81.8).
* **ficoco** (FiCoCo, Han et al. 2024/2025, LLM-Viewer numbers): the same LLM-only prefill count with 60
  text tokens for 7B and 512 for 13B: 576 + 60 -> 8.45 T (printed 8.5); 192 / 128 / 64 visual tokens ->
  3.30 / 2.45 / 1.61 (printed 3.3 / 2.4-2.5 / 1.6); 13B 576 + 512 -> 28.58 (printed 28.6).
* **fastv** (FastV, Chen et al. ECCV 2024, eq. 5 and Table 1): per-layer `4nd^2 + 2n^2d + 2ndm` (MHA and
  a 2-matrix FFN, one "FLOP" per MAC as printed), n = system + image tokens (text excluded); Table 1's
  "FLOPs(B)" is this formula averaged over the layers, with n = system prompt + 576 image tokens:
  35 + 576 = 611 for 7B and 36 + 576 = 612 for 13B (FastV's `--fast-v-sys-length`), the values that
  reproduce the reduced rows (7B K=2: 54.6 / 32.8 / 19.9; 13B K=2: 84.6 / 50.2 / 29.7). Vanilla: 99.2 B
  (7B; the paper prints 99.3, which only n = 612 gives — an inconsistency of the paper) and 154.6 B (13B).

* **divprune** (DivPrune, Alvar et al. CVPR 2025, the official `tflops.py` behind its TFLOPs ratios): FastV's
  per-layer formula `4nd^2 + 2n^2d + 2ndm` (MACs, printed as FLOPs) summed over all layers, n = text + visual
  tokens, for each of the 11 benchmarks of its Table 1 with their text lengths (and, for LLaVA-NeXT, their
  visual-token counts) as that script lists them, averaged over the benchmarks (TFLOPs and the ratio as a
  mean of per-benchmark ratios). A method that drops visual tokens before the first LLM layer enters with the
  count it keeps (`visual_tokens_kept`). LLaVA-1.5-7B with DivPrune's 0.098: 3.23 -> 0.51 T, 15.6 %.

A reduction method enters a convention through its own `analytic_prefill_macs(shapes, layout)`, called
with the convention's layout (text after the image; see `convention_layout`).
"""
from __future__ import annotations

from typing import Any

from harness.efficiency import analytic as A

CONVENTIONS = ("full", "shortv", "ficoco", "fastv", "divprune")

SHORTV_TEXT = 64
FICOCO_TEXT_7B = 60
FICOCO_TEXT_13B = 512
FASTV_SYSTEM_7B = 35  # FastV's system-prompt length for LLaVA-1.5-7B (n = 611 with 576 image tokens)
FASTV_SYSTEM_13B = 36  # ... and for 13B (n = 612)
#: DivPrune's tflops.py: text tokens of its 11 image benchmarks (COCO-2017 captions, Flickr30k, GQA, MMBench, MME,
#: MMMU, NoCaps, OK-VQA, POPE, ScienceQA-IMG, SEED-Bench) and, for LLaVA-NeXT, their visual-token counts
DIVPRUNE_TEXT = (15, 15, 23, 83, 25, 113, 15, 39, 21, 91, 57)
DIVPRUNE_VISUAL_NEXT = (2225, 1922, 2239, 1927, 2108, 1882, 2292, 2249, 2250, 1598, 2116)
#: methods whose kept visual tokens enter every LLM layer (removed before layer 0 or in the vision tower)
DROP_BEFORE_LLM = ("random", "divprune", "visionzip", "vispruner", "tome", "ficoco_v")

DESCRIPTIONS = {
    "full": "all components (vision, projector, LLM prefill, lm_head on the last position), exact token "
    "counts; FLOPs = 2 x MACs of matrix products (attention QK^T and AV over the full n x n, no causal "
    "halving); element-wise ops not counted",
    "shortv": "ShortV: LLM prefill only, t=64 text tokens, v=576 (LLaVA-1.5) / 2880 (LLaVA-NeXT) visual "
    "tokens, full T^2 attention, SwiGLU 3 matrices, FLOPs = 2 x MACs",
    "ficoco": "FiCoCo (LLM-Viewer): LLM prefill only, 60 text tokens (7B) / 512 (13B), SwiGLU 3 matrices, "
    "attention QK^T and AV, FLOPs = 2 x MACs",
    "fastv": "FastV: per layer 4nd^2 + 2n^2d + 2ndm (MACs, printed as FLOPs), n = system + image tokens, "
    "Table 1 'FLOPs(B)' = average over layers",
    "divprune": "DivPrune (tflops.py): 4nd^2 + 2n^2d + 2ndm (MACs, printed as FLOPs) summed over the layers, "
    "n = text + visual tokens, averaged over its 11 benchmarks' text lengths",
}


def _shapes(config) -> A.ModelShapes:
    return A.ModelShapes.from_config(config)


def is_next(config) -> bool:
    return getattr(config, "model_type", None) == "llava_next"


def paper_visual_tokens(config) -> int:
    """The papers' fixed visual-token count: 576 per LLaVA-1.5 image, 5 x 576 for LLaVA-NeXT; for a
    dynamic-resolution family (Qwen2-VL) the reference image's count (448x448: 256), an assumption."""
    if getattr(config, "model_type", None) in A.QWEN_VL_FAMILIES:
        from harness.models.adapter import qwen_visual_tokens

        return qwen_visual_tokens(config)
    vc = config.vision_config
    per_crop = (vc.image_size // vc.patch_size) ** 2
    return 5 * per_crop if is_next(config) else per_crop


def ficoco_text_tokens(config) -> int:
    """FiCoCo's assumed text length: 60 for 7B-class LLMs, 512 for 13B-class (>= 40 layers)."""
    return FICOCO_TEXT_13B if config.text_config.num_hidden_layers >= 40 else FICOCO_TEXT_7B


def convention_layout(visual: int, text: int, images: int = 1) -> A.TokenLayout:
    """The synthetic prompt of the paper conventions: the visual tokens, then `text` text tokens."""
    return A.TokenLayout(before=0, visual=visual, after=text, images=images)


def llm_prefill_flops(config, visual: int, text: int, method=None) -> int:
    """LLM-only prefill FLOPs (2 x MACs) for `visual` + `text` tokens, dense or with `method`."""
    shapes = _shapes(config)
    layout = convention_layout(visual, text)
    if method is None:
        return A.flops(A.llm_prefill_macs(shapes.llm, layout.total))
    return A.flops(method.analytic_prefill_macs(shapes, layout)["llm"])


def shortv_flops(config, visual: int | None = None, text: int = SHORTV_TEXT, method=None) -> int:
    """ShortV's convention (LLM prefill, t=64, v=576 / 2880)."""
    v = paper_visual_tokens(config) if visual is None else visual
    return llm_prefill_flops(config, v, text, method)


def ficoco_flops(config, visual: int | None = None, text: int | None = None, method=None) -> int:
    """FiCoCo's convention (LLM prefill, 60 text tokens for 7B / 512 for 13B)."""
    v = paper_visual_tokens(config) if visual is None else visual
    t = ficoco_text_tokens(config) if text is None else text
    return llm_prefill_flops(config, v, t, method)


def fastv_n(config, image: int = 576) -> int:
    """FastV's n = system prompt + image tokens (611 for 7B-class, 612 for 13B-class LLMs)."""
    sys_len = FASTV_SYSTEM_13B if config.text_config.num_hidden_layers >= 40 else FASTV_SYSTEM_7B
    return sys_len + image


def fastv_layer_macs(config, n: float) -> float:
    """FastV's per-layer formula 4nd^2 + 2n^2d + 2ndm (MACs; FastV prints them as FLOPs)."""
    tc = config.text_config
    d = tc.hidden_size
    # MHA (the head split does not change the count) with a 2-matrix FFN: exactly 4nd^2 + 2n^2d + 2ndm
    s = A.LLMShape(hidden=d, intermediate=tc.intermediate_size, layers=1, heads=1, kv_heads=1,
                   head_dim=d, vocab=0, mlp_matrices=2)
    return A.llm_layer_macs(s, n)


def fastv_flops(config, tokens_per_layer: list[float] | None = None, n: float | None = None) -> float:
    """FastV Table 1 "FLOPs": the per-layer formula averaged over the layers.

    tokens_per_layer: n entering each layer (a reduced method); default `n` for every layer.
    FastV with filtering layer K and k kept image tokens: `[n]*K + [n - (N_img - k)]*(L - K)`.
    """
    L = config.text_config.num_hidden_layers
    n = fastv_n(config) if n is None else n
    ns = list(tokens_per_layer) if tokens_per_layer is not None else [n] * L
    if len(ns) != L:
        raise ValueError(f"tokens_per_layer has {len(ns)} entries for {L} layers")
    return sum(fastv_layer_macs(config, k) for k in ns) / L


def fastv_tokens_per_layer(config, K: int, R: float, image: int = 576) -> list[float]:
    """Tokens per layer under FastV's own accounting: n up to layer K, then n - image * R (unrounded,
    as the paper's table)."""
    L = config.text_config.num_hidden_layers
    n = fastv_n(config, image)
    return [n] * K + [n - image * R] * (L - K)


def ficoco_budget_tokens(method, visual: int, per_crop: int) -> int | None:
    """The final visual-token count a FiCoCo budget label refers to, for `visual` tokens entering the
    LLM: FiCoCo-L `final_tokens` or `final_ratio` x visual; FiCoCo-VL `tokens` per crop of `per_crop`
    tokens, i.e. the same share of `visual` (LLaVA-NeXT: several crops); None for other methods."""
    name = getattr(method, "name", None)
    if name == "ficoco_l":
        if getattr(method, "final_ratio", None) is not None:
            return max(1, round(float(method.final_ratio) * visual))
        return getattr(method, "final_tokens", None)
    if name == "ficoco_vl":
        tokens = getattr(method, "tokens", None)
        return None if tokens is None else max(1, round(tokens * visual / per_crop))
    return None


def divprune_flops(config, method=None) -> tuple[float, float]:
    """DivPrune's convention: (mean MACs over its 11 benchmarks, mean of the per-benchmark ratios to dense).
    `method` (dropping visual tokens before the first LLM layer) enters with `visual_tokens_kept`."""
    L = config.text_config.num_hidden_layers
    visuals = DIVPRUNE_VISUAL_NEXT if is_next(config) else (paper_visual_tokens(config),) * len(DIVPRUNE_TEXT)
    totals, ratios = [], []
    for t, v in zip(DIVPRUNE_TEXT, visuals):
        kept = v if method is None else min(v, int(method.visual_tokens_kept(convention_layout(v, t))))
        dense = L * fastv_layer_macs(config, t + v)
        total = L * fastv_layer_macs(config, t + kept)
        totals.append(total)
        ratios.append(total / dense)
    return sum(totals) / len(totals), sum(ratios) / len(ratios)


def full_flops(config, layout: A.TokenLayout, method=None) -> dict[str, int]:
    """Our convention: per-component FLOPs of one prefill (see `flops.analytic_prefill`)."""
    from harness.efficiency.flops import analytic_prefill

    return analytic_prefill(config, layout, method)


def evaluate(name: str, config, *, visual: int | None = None, text: int | None = None,
             layout: A.TokenLayout | None = None, method=None) -> dict[str, Any]:
    """One convention's number for a model config (+ optional method) as a JSON-able dict."""
    if name not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {name!r}; choose from {', '.join(CONVENTIONS)}")
    out: dict[str, Any] = {"convention": name, "description": DESCRIPTIONS[name]}
    if name == "full":
        if layout is None:
            raise ValueError("the full convention needs the exact token layout")
        per = full_flops(config, layout, method)
        out.update(flops=per, total=int(sum(per.values())), layout=layout.__dict__)
    elif name == "shortv":
        v = paper_visual_tokens(config) if visual is None else visual
        t = SHORTV_TEXT if text is None else text
        out.update(total=shortv_flops(config, v, t, method), visual=v, text=t)
    elif name == "ficoco":
        v = paper_visual_tokens(config) if visual is None else visual
        t = ficoco_text_tokens(config) if text is None else text
        out.update(total=ficoco_flops(config, v, t, method), visual=v, text=t)
        final = ficoco_budget_tokens(method, v, _shapes(config).vit.patches)
        if final is not None and final < v:
            out.update(label_total=ficoco_flops(config, final, t), label_visual=final, label_note=(
                f"FiCoCo's budget label: the dense LLM with the {final} final visual tokens entering it (the "
                f"labels 3.3/2.4/1.5 T <-> 192/128/64 tokens, spec §3.5 budget mapping); the method's own "
                f"FLOPs under the same convention are the 'total', higher for an in-LLM method because its "
                f"first layers see every visual token"))
    elif name == "divprune":
        name_m = getattr(method, "name", "none") if method is not None else "none"
        if name_m not in ("none",) + DROP_BEFORE_LLM:
            out["note"] = f"DivPrune's convention has no formula for {name_m!r} (it drops inside the LLM); dense value shown"
            method = None
        total, ratio = divprune_flops(config, method)
        out.update(total=total, paper_ratio=ratio, text=list(DIVPRUNE_TEXT), unit="MACs (printed as FLOPs by DivPrune)")
    else:
        name_m = getattr(method, "name", "none") if method is not None else "none"
        tokens = None
        if name_m == "fastv":  # FastV's own accounting of its pruning (unrounded n - 576 R)
            keep = getattr(method, "keep", None)
            R = (576 - min(int(keep), 576)) / 576 if keep is not None else float(method.R)
            tokens = fastv_tokens_per_layer(config, int(method.K), R)
        elif name_m != "none":
            out["note"] = f"FastV's convention has no formula for {name_m!r}; dense value shown"
        out.update(total=fastv_flops(config, tokens), n=fastv_n(config), unit="MACs (printed as FLOPs by FastV)")
    return out
