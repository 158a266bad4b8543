"""ShortV: freeze visual tokens in ineffective layers (Yuan et al., "ShortV: Efficient Multimodal Large
Language Models by Freezing Visual Tokens in Ineffective Layers", arXiv 2504.00502, ICCV 2025).

In each of `N` chosen decoder layers (the "ShortV layers"), visual tokens are not queries and skip W_O and
the FFN: their hidden state passes through unchanged, `Y[V] = H[V]`. Their keys and values are still
computed from the (unchanged) visual hidden states and written to the KV cache, so text tokens attend to
them exactly as in a dense layer; text rows get the dense layer's output, `Y[U] = H'[U] + FFN(H'[U])`
with `H'[U] = H[U] + Attn(Q_U, K, V) W_O` (spec A4.1). Decode steps are unchanged (A4.2).

Layer choice: the `N` layers with the lowest visual Layer Contribution (paper Eq. for
`LC_i = KL(p(M_i^V) || p(M))` at the last prompt token, spec A5), computed by
`methods._shared.calibration.layer_contribution`; the paper's lists for LLaVA-1.5/NeXT 7B/13B ship as
`conf/model_method/<model>_shortv.yaml`.

FLOPs (spec A7; prefill, LLM only, full T^2): a ShortV layer costs
`llm_layer_macs(s, n_q=t, n_kv=T, n_k=T, n_o=t, n_ffn=t)`; `shortv_paper_tflops` reproduces Tables 1-2
with the paper's convention (t = 64 text tokens, v = 576 / 2880).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from methods import register
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


@register
@dataclasses.dataclass
class ShortV(Method):
    name = "shortv"
    noop = {"layers": []}
    example = {"layers": [3, 1]}
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values

    #: layer indices (0-based) to freeze, in priority (ascending visual LC) order; or "auto" = the first
    #: `N` layers of the ranking in the calibration artefact `calibration`
    layers: Any = dataclasses.field(default_factory=list)
    #: number of layers to freeze: a prefix of `layers` (None = all of them); required with "auto"
    N: int | None = None
    #: path of a Layer Contribution artefact (JSON with "ranking") for layers="auto"; left null, `vtbench`
    #: computes (or reuses) the artefact for the model and the `calibration` config before applying
    calibration: str | None = None

    budget_param = "N"
    #: values of N a budget may replace: N=0 with layers=auto (conf/method/shortv_auto.yaml) is the documented
    #: "let the budget choose N" (harness.config's budget-conflict check treats it as unset)
    budget_unset: ClassVar[dict] = {"N": (0, None)}
    calibration_fields = ("calibration",)

    def budget_candidates(self, adapter) -> list:
        """N = 0..L (needs layers='auto' or a list at least that long)."""
        n = adapter.num_llm_layers if self.layers == "auto" else len(list(self.layers))
        return list(range(0, n + 1))

    # ---- checks ----------------------------------------------------------------------------------
    def check_params(self) -> None:
        if isinstance(self.layers, str):
            if self.layers != "auto":
                raise MethodError(f"shortv: layers must be a list of layer indices or 'auto', got {self.layers!r}")
            if self.N is None:
                raise MethodError("shortv: layers='auto' needs N (number of layers to freeze)")
        else:
            try:
                layers = list(self.layers)
            except TypeError:
                raise MethodError(f"shortv: layers must be a list of layer indices or 'auto', got {self.layers!r}") from None
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise MethodError(f"shortv: layer index {i!r} is not an integer")
                if i < 0:
                    raise MethodError(f"shortv: layer index {i} is negative")
            dup = sorted({i for i in layers if layers.count(i) > 1})
            if dup:
                raise MethodError(f"shortv: duplicated layer index(es) {dup}")
            if self.N is not None and self.N > len(layers):
                raise MethodError(f"shortv: N={self.N} exceeds the {len(layers)} listed layers")
        if self.N is not None and (isinstance(self.N, bool) or not isinstance(self.N, int) or self.N < 0):
            raise MethodError(f"shortv: N must be a non-negative integer, got {self.N!r}")

    def validate(self, adapter) -> None:
        super().validate(adapter)
        self.check_params()
        L = adapter.num_llm_layers
        if self.layers == "auto":
            if self.N > L:
                raise MethodError(f"shortv: N={self.N} exceeds the model's {L} LLM layers")
            if self.calibration:
                self._ranking(L)
        else:
            bad = [i for i in self.layers if i >= L]
            if bad:
                raise MethodError(f"shortv: layer index(es) {bad} out of range for a model with {L} LLM layers")
        from methods._shared.reduced_layer import check_layer_structure

        # with 'auto' and no artefact yet, any layer may be chosen: check them all
        candidates = range(L) if (self.layers == "auto" and not self.calibration) else self.frozen_layers(L)
        for i in candidates:
            reason = check_layer_structure(adapter.llm_layers[i])
            if reason:
                raise MethodError(f"shortv: {reason}")
        if self.num_frozen():
            self.require_full_attention(adapter)

    def _ranking(self, num_layers: int) -> list[int]:
        if not self.calibration:
            raise MethodError(
                "shortv: layers='auto' needs a Layer Contribution artefact: run through vtbench (which "
                "calibrates) or pass calibration=<path from vtbench-calibrate>"
            )
        path = Path(self.calibration)
        if not path.is_file():
            raise MethodError(f"shortv: calibration artefact {path} not found (run vtbench-calibrate first)")
        from methods._shared.calibration import ArtefactError, read_artefact

        try:  # sealed, untouched, consistent with its scores, and for a model of this depth
            art = read_artefact(path, num_layers=num_layers)
        except ArtefactError as e:
            raise MethodError(f"method.params.calibration={path}: invalid calibration artefact: {e}") from None
        if (art["key_parts"].get("method"), art["key_parts"].get("kind")) != ("shortv", "visual"):
            raise MethodError(f"method.params.calibration={path}: invalid calibration artefact: it is not a "
                              f"ShortV visual Layer Contribution (method={art['key_parts'].get('method')!r}, "
                              f"kind={art['key_parts'].get('kind')!r})")
        return list(art["ranking"])

    # ---- layers ------------------------------------------------------------------------------------
    def frozen_layers(self, num_layers: int | None = None) -> list[int]:
        """The frozen layer indices, in priority order."""
        if self.layers == "auto":
            if num_layers is None:
                raise MethodError("shortv: layers='auto' needs the model's layer count")
            return self._ranking(num_layers)[: self.N]
        layers = list(self.layers)
        return layers if self.N is None else layers[: self.N]

    def num_frozen(self) -> int:
        return self.N if self.layers == "auto" else len(self.frozen_layers())

    # ---- apply ---------------------------------------------------------------------------------------
    def apply(self, model, adapter):
        self.validate(adapter)
        frozen = self.frozen_layers(adapter.num_llm_layers)
        if not frozen:
            return model
        self.require_full_attention(adapter)
        from methods._shared.context import install_context
        from methods._shared.reduced_layer import patch_layer

        ctx = install_context(model, adapter)
        for i in frozen:
            patch_layer(adapter.llm_layers[i], i, ctx, _shortv_plan)
        return model

    # ---- FLOPs -----------------------------------------------------------------------------------------
    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        from harness.efficiency.analytic import dense_prefill_macs

        out = dense_prefill_macs(shapes, layout)
        s = shapes.llm
        out["llm"] = sum(self.llm_layer_macs_at(s, i, layout) for i in range(s.layers))
        return out

    def llm_layer_macs_at(self, s, layer: int, layout) -> int:
        """A frozen layer: text rows dense, visual rows K/V only (spec A7); other layers dense. The
        frozen set is the first N of the list (a count when layers='auto' has no artefact yet: the
        analytic cost does not depend on which layers)."""
        from harness.efficiency.analytic import llm_layer_macs

        T, t = layout.total, layout.text
        frozen = layer in self._frozen_set(s.layers) if self._frozen_known() else layer < self.num_frozen()
        if frozen:
            return llm_layer_macs(s, n_q=t, n_kv=T, n_k=T, n_o=t, n_ffn=t)
        return llm_layer_macs(s, T)

    def _frozen_known(self) -> bool:
        return self.layers != "auto" or bool(self.calibration)

    def _frozen_set(self, num_layers: int) -> set[int]:
        return set(self.frozen_layers(num_layers))


def _shortv_plan(ctx, layer_idx, hidden_states):
    """Frozen layer: every non-visual token (text and padding) is a query and goes through W_O and
    the FFN; visual tokens do neither. The plan is shared by all frozen layers of one forward."""
    from methods._shared.reduced_layer import FFNGroup, LayerPlan, QueryGroup, ragged_positions

    if not bool(ctx.visual_mask.any()):
        return None  # text-only batch: the stock layer, bit for bit
    plan = ctx.scratch.get("shortv_plan")
    if plan is None:
        index, valid = ragged_positions(~ctx.visual_mask)
        plan = LayerPlan(queries=[QueryGroup(index, valid)], ffn=[FFNGroup(index, valid)])
        ctx.scratch["shortv_plan"] = plan
    return plan


# ---- paper FLOPs convention (spec A7) -----------------------------------------------------------------
def shortv_paper_tflops(config, N: int, t: int = 64, v: int | None = None) -> dict[str, float]:
    """ShortV's Table 1-2 TFLOPs: prefill, LLM decoder only, full T^2 attention, `t` = 64 text tokens,
    `v` visual tokens (default: `image_seq_length`, x5 for LLaVA-NeXT = 4 crops + base image, newline
    tokens ignored, as the paper does). FLOPs = 2 x MACs.

    Returns {"dense", "shortv": exact TFLOPs, "ratio": exact shortv/dense, "dense_printed",
    "shortv_printed": one decimal as printed, "ratio_printed": percent as printed}. The printed values
    follow the paper's apparent rounding, which every entry of Tables 1-2 matches: TFLOPs rounded half-up
    to two decimals then to one (NeXT-13B N=32: 27.447 -> 27.45 -> "27.5"; a single rounding gives 27.4),
    and the percentage = ratio of the *printed* TFLOPs, rounded half-up (1.5-7B N=24: 3.7/8.5 = 43.5% ->
    "44%", while the exact ratio is 43.4%).
    """
    from harness.efficiency.analytic import LLMShape, flops, llm_layer_macs

    s = LLMShape.from_config(config.text_config)
    if v is None:
        v = int(config.image_seq_length) * (5 if config.model_type == "llava_next" else 1)
    T = t + v
    dense_layer = llm_layer_macs(s, T)
    frozen_layer = llm_layer_macs(s, n_q=t, n_kv=T, n_k=T, n_o=t, n_ffn=t)
    dense = flops(s.layers * dense_layer) / 1e12
    short = flops((s.layers - N) * dense_layer + N * frozen_layer) / 1e12
    d_p, s_p = _half_up(_half_up(dense, 2), 1), _half_up(_half_up(short, 2), 1)
    return {
        "dense": dense,
        "shortv": short,
        "ratio": short / dense,
        "dense_printed": d_p,
        "shortv_printed": s_p,
        "ratio_printed": int(_half_up(100 * s_p / d_p, 0)),
    }


def _half_up(x: float, digits: int) -> float:
    from decimal import ROUND_HALF_UP, Decimal

    return float(Decimal(repr(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))
