"""RedundancyLens: Hollow Attention and Probe-Activated Dynamic FFN for visual tokens (Li et al.,
"RedundancyLens: Revealing and Exploiting Visual Token Processing Redundancy for Efficient Decoder-Only
MLLMs", arXiv 2501.19036, ACL 2025 Findings; v1 title "Beyond Token Compression").

No public code and only the abstract were available: everything beyond "visual tokens only, local
visual attention keeping visual-text associations, probe-activated FFN parameters, a greedy layer
ranking" is reconstructed (spec `layer_methods.md` Part B, tags [SEC]/[INF]) and kept a named parameter.

Per reduced layer, prefill only (decode steps and text tokens are unchanged; visual K/V are still
computed and cached):

* **Hollow Attention** (layers `hollow_layers`): a visual query of visual rank `r_q` attends to the
  non-visual tokens before it and to the visual tokens of rank `r_q - window < r_k <= r_q` (rank space,
  B8.2); text queries attend causally to everything. Computed sparsely: text queries in one SDPA call,
  visual queries in blocks of `hollow_block` consecutive ranks, each over the non-visual prefix keys plus
  the union of its queries' windows (masked exactly), so the scored pairs are
  `t*T + sum_blocks n_b * (p + window_keys_b)` instead of `T^2`.
* **Probe-Activated Dynamic FFN** (layers `ffn_layers`): per sample and layer, `M = ceil(probe_ratio*N)`
  of the sample's `N` visual tokens (probes) go through the gate/up projections; channel importance
  `s_j = mean_probes |act(x W_gate[j]) * (x W_up[j])|` (SwiGLU form of the paper's mean absolute hidden
  activation, B2); the top `K = round(ffn_keep * d_ff)` channels form the FFN of all visual tokens of
  that sample, `down[:, S](act(gate[S] x) * up[S] x)`; text tokens keep the full FFN.
* **Layer ranking** (B4): `methods._shared.calibration.greedy_layer_ranking` with a validation
  objective; `kl_evaluator` here gives a cheap model-based objective (agreement of the last-token
  distribution with the unreduced model). `hollow_layers="auto"` / `ffn_layers="auto"` take the first
  `round(ratio * L)` layers of the stored ranking.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from methods import register
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError

PROBE_SAMPLING = ("random", "strided")


@register
@dataclasses.dataclass
class RedundancyLens(Method):
    name = "redundancylens"
    noop = {"hollow_layers": [], "ffn_layers": []}
    example = {"hollow_layers": [0, 2], "ffn_layers": [2, 3], "window": 6, "hollow_block": 32, "ffn_keep": 0.25}
    families = LLM_SIDE_FAMILIES
    meta_countable = False  # finds the visual tokens from input_ids values
    #: a budget sets the proportion of reduced layers (both reductions, on the 'auto' rankings)
    budget_param = "ratio"
    calibration_fields = ("calibration_hollow", "calibration_ffn")

    #: layers with Hollow Attention: list of 0-based indices, or "auto" (prefix of a stored ranking)
    hollow_layers: Any = dataclasses.field(default_factory=list)
    #: layers with Probe-Activated Dynamic FFN: list, or "auto"
    ffn_layers: Any = dataclasses.field(default_factory=list)
    #: fraction of the layers taken from the ranking when hollow_layers="auto" [INF: ~half, B8.5]
    hollow_ratio: float = 0.5
    #: fraction of the layers taken from the ranking when ffn_layers="auto"
    ffn_ratio: float = 0.5
    #: ranking artefacts (JSON with a full "ranking" permutation) for the "auto" lists
    calibration_hollow: str | None = None
    calibration_ffn: str | None = None
    #: R_A: visual keys a visual query sees, itself included, counted in visual rank [SEC: 256]
    window: int = 256
    #: visual queries per sparse-attention block (compute granularity only; results do not depend on it)
    hollow_block: int = 64
    #: FFN channels kept for visual tokens, as a fraction of d_ff [SEC: 0.2]
    ffn_keep: float = 0.2
    #: probes per sample = ceil(probe_ratio * visual tokens), at least 1 [3P/INF: 0.1]
    probe_ratio: float = 0.1
    #: "random" (paper-faithful per [SEC]) or "strided" (evenly spaced, as [3P])
    probe_sampling: str = "random"
    #: seed of the random probes; probes depend only on (seed, layer, visual-token count), never on
    #: the batch composition
    seed: int = 0

    # ---- checks -------------------------------------------------------------------------------------
    def check_params(self) -> None:
        for field_name in ("hollow_layers", "ffn_layers"):
            layers = getattr(self, field_name)
            if isinstance(layers, str):
                if layers != "auto":
                    raise MethodError(f"redundancylens: {field_name} must be a list of layer indices or 'auto', got {layers!r}")
                # without a ranking artefact, `vtbench` computes (or reuses) it before applying
                continue
            try:
                layers = list(layers)
            except TypeError:
                raise MethodError(f"redundancylens: {field_name} must be a list of layer indices or 'auto'") from None
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise MethodError(f"redundancylens: {field_name} index {i!r} is not an integer")
                if i < 0:
                    raise MethodError(f"redundancylens: {field_name} index {i} is negative")
            dup = sorted({i for i in layers if layers.count(i) > 1})
            if dup:
                raise MethodError(f"redundancylens: duplicated {field_name} index(es) {dup}")
        for name, lo_open in (("hollow_ratio", False), ("ffn_ratio", False), ("ffn_keep", True), ("probe_ratio", True)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0 < val <= 1 if lo_open else 0 <= val <= 1):
                rng = "(0, 1]" if lo_open else "[0, 1]"
                raise MethodError(f"redundancylens: {name}={val!r} out of range {rng}")
        for name in ("window", "hollow_block"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise MethodError(f"redundancylens: {name} must be a positive integer, got {val!r}")
        if self.probe_sampling not in PROBE_SAMPLING:
            raise MethodError(f"redundancylens: probe_sampling must be one of {PROBE_SAMPLING}, got {self.probe_sampling!r}")
        from methods import check_seed

        check_seed("redundancylens", "seed", self.seed)

    def validate(self, adapter) -> None:
        super().validate(adapter)
        self.check_params()
        L = adapter.num_llm_layers
        for field_name in ("hollow_layers", "ffn_layers"):
            layers = getattr(self, field_name)
            if layers != "auto":
                bad = [i for i in layers if i >= L]
                if bad:
                    raise MethodError(
                        f"redundancylens: {field_name} index(es) {bad} out of range for a model with {L} LLM layers"
                    )
        if (self.hollow_layers == "auto" and not self.calibration_hollow) or (
            self.ffn_layers == "auto" and not self.calibration_ffn
        ):
            layers_to_check = range(L)  # the ranking is not known yet: every layer may be chosen
        else:
            hollow, ffn = self.resolved_layers(L)
            layers_to_check = sorted(set(hollow) | set(ffn))
        from methods._shared.reduced_layer import check_layer_structure

        for i in layers_to_check:
            reason = check_layer_structure(adapter.llm_layers[i])
            if reason:
                raise MethodError(f"redundancylens: {reason}")
        pairs = ((self.hollow_layers, self.hollow_ratio), (self.ffn_layers, self.ffn_ratio))
        if any(float(ratio) > 0 if layers == "auto" else len(layers) > 0 for layers, ratio in pairs):
            self.require_full_attention(adapter)

    # ---- layers -------------------------------------------------------------------------------------------
    def _ranking(self, path: str | None, num_layers: int, field: str = "calibration") -> list[int]:
        if not path:
            raise MethodError(
                "redundancylens: an 'auto' layer list needs a layer-ranking artefact: run through vtbench "
                "(which calibrates) or pass calibration_hollow/calibration_ffn=<path from vtbench-calibrate>"
            )
        p = Path(path)
        if not p.is_file():
            raise MethodError(f"redundancylens: ranking artefact {p} not found (run vtbench-calibrate first)")
        from methods._shared.calibration import ArtefactError, read_artefact

        try:  # sealed, untouched, rounds consistent with the ranking, for a model of this depth
            art = read_artefact(p, num_layers=num_layers)
        except ArtefactError as e:
            raise MethodError(f"method.params.{field}={p}: invalid calibration artefact: {e}") from None
        kind = field.rsplit("_", 1)[-1]
        if (art["key_parts"].get("method"), art["key_parts"].get("kind")) != ("redundancylens", kind):
            raise MethodError(f"method.params.{field}={p}: invalid calibration artefact: it is not a RedundancyLens "
                              f"{kind} ranking (method={art['key_parts'].get('method')!r}, "
                              f"kind={art['key_parts'].get('kind')!r})")
        return list(art["ranking"])

    def budget_candidates(self, adapter) -> list:
        L = adapter.num_llm_layers
        return [i / L for i in range(L + 1)]

    def budget_params(self, value) -> dict:
        """Reduce the top `value` proportion of both rankings (`hollow_layers`/`ffn_layers` = 'auto')."""
        return {"hollow_layers": "auto", "ffn_layers": "auto", "hollow_ratio": value, "ffn_ratio": value}

    def resolved_layers(self, num_layers: int) -> tuple[list[int], list[int]]:
        """(hollow layers, FFN layers) for a model with `num_layers` LLM layers."""
        out = []
        for layers, ratio, cal, field in ((self.hollow_layers, self.hollow_ratio, self.calibration_hollow,
                                           "calibration_hollow"),
                                          (self.ffn_layers, self.ffn_ratio, self.calibration_ffn, "calibration_ffn")):
            if layers == "auto":
                out.append(self._ranking(cal, num_layers, field)[: int(round(ratio * num_layers))])
            else:
                out.append(list(layers))
        return out[0], out[1]

    def layer_counts_or_lists(self, num_layers: int) -> tuple[list[int], list[int]]:
        """Resolved layer lists; for an 'auto' list whose ranking is not computed yet, the first layers
        stand in (all LLM layers cost the same, so the FLOPs depend only on how many are reduced)."""
        out = []
        for layers, ratio, cal in ((self.hollow_layers, self.hollow_ratio, self.calibration_hollow),
                                   (self.ffn_layers, self.ffn_ratio, self.calibration_ffn)):
            if layers == "auto" and not cal:
                out.append(list(range(int(round(ratio * num_layers)))))
            else:
                out.append(self.resolved_layers(num_layers)[len(out)])
        return out[0], out[1]

    def ffn_channels(self, intermediate: int) -> int:
        return max(1, min(intermediate, int(round(self.ffn_keep * intermediate))))

    def num_probes(self, n_visual: int) -> int:
        return max(1, math.ceil(self.probe_ratio * n_visual)) if n_visual > 0 else 0

    def probe_ranks(self, n_visual: int, layer_idx: int) -> torch.Tensor:
        """Sorted visual ranks of the probes of a sample with `n_visual` visual tokens at `layer_idx`."""
        M = self.num_probes(n_visual)
        if self.probe_sampling == "strided":
            return ((torch.arange(M, dtype=torch.float64) + 0.5) * n_visual / M).floor().long()
        digest = hashlib.sha256(f"{int(self.seed)}:{int(layer_idx)}:{int(n_visual)}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF)
        return torch.randperm(n_visual, generator=g)[:M].sort().values

    # ---- apply ------------------------------------------------------------------------------------------------
    def apply(self, model, adapter):
        self.validate(adapter)
        hollow, ffn = self.resolved_layers(adapter.num_llm_layers)
        if not hollow and not ffn:
            return model
        self.require_full_attention(adapter)
        from methods._shared.context import install_context
        from methods._shared.reduced_layer import patch_layer

        ctx = install_context(model, adapter)
        hollow_set, ffn_set = set(hollow), set(ffn)
        for i in sorted(hollow_set | ffn_set):
            layer = adapter.llm_layers[i]
            patch_layer(layer, i, ctx, _Planner(self, layer, i, i in hollow_set, i in ffn_set))
        return model

    # ---- FLOPs ------------------------------------------------------------------------------------------------
    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        from harness.efficiency.analytic import dense_prefill_macs

        out = dense_prefill_macs(shapes, layout)
        s = shapes.llm
        hollow, ffn = self.layer_counts_or_lists(s.layers)
        out["llm"] = sum(
            self.layer_macs(s, layout, i in hollow, i in ffn) for i in range(s.layers)
        )
        return out

    def llm_layer_macs_at(self, s, layer: int, layout) -> int:
        hollow, ffn = self.layer_counts_or_lists(s.layers)
        return self.layer_macs(s, layout, layer in hollow, layer in ffn)

    def layer_macs(self, s, layout, hollow: bool, ffn: bool) -> int:
        """MACs of one decoder layer (batch 1; the p non-visual tokens before the last visual one are
        every Hollow visual query's prefix keys: text before the first image and between images)."""
        from harness.efficiency.analytic import llm_layer_macs

        T, t, v, p = layout.total, layout.text, layout.visual, layout.before + layout.between
        hollow = hollow and 0 < v and self.window < v
        ffn = ffn and 0 < v and self.ffn_keep < 1
        pairs = t * T + hollow_visual_pairs(v, p, self.window, self.hollow_block) if hollow else None
        macs = llm_layer_macs(s, n_q=T, n_kv=T, n_k=T, n_o=T, n_ffn=t if ffn else T, attn_pairs=pairs)
        if ffn:
            # visual rows through K channels, plus the probes' gate/up projections at full width
            macs += llm_layer_macs(s, n_q=0, n_kv=0, n_k=0, n_o=0, n_ffn=v, ffn_channels=self.ffn_channels(s.intermediate))
            probe = dataclasses.replace(s, mlp_matrices=s.mlp_matrices - 1)
            macs += llm_layer_macs(probe, n_q=0, n_kv=0, n_k=0, n_o=0, n_ffn=self.num_probes(v))
        return macs


def hollow_visual_pairs(v: int, p: int, window: int, block: int) -> int:
    """(query, key) pairs scored for the visual queries of one Hollow layer, as computed: blocks of
    `block` consecutive visual ranks, each over the `p` non-visual prefix keys plus the visual keys of
    ranks `[a - window + 1, a + n_b - 1]`."""
    pairs = 0
    for a in range(0, v, block):
        n_b = min(block, v - a)
        lo = max(0, a - window + 1)
        pairs += n_b * (p + (a + n_b - lo))
    return pairs


class _Planner:
    """Builds the reduced-layer plan of one layer for the current prefill."""

    def __init__(self, method: RedundancyLens, layer, layer_idx: int, hollow: bool, ffn: bool):
        self.m, self.layer, self.idx, self.hollow, self.ffn = method, layer, layer_idx, hollow, ffn

    def __call__(self, ctx, layer_idx, hidden_states):
        from methods._shared.reduced_layer import FFNGroup, LayerPlan, QueryGroup, ragged_positions

        vm = ctx.visual_mask
        B, T = vm.shape
        key = "redundancylens_tokens"
        tok = ctx.scratch.get(key)
        if tok is None:
            real = ctx.attention_mask.bool() if ctx.attention_mask is not None else torch.ones_like(vm)
            v_idx, v_valid = ragged_positions(vm)
            n_vis = vm.sum(1)
            # non-visual, non-padding tokens before each sample's last visual token: the keys every visual
            # query may see outside its window (masked causally)
            pos = torch.arange(T, device=vm.device)
            last_vis = torch.where(vm, pos, torch.full_like(pos, -1)).amax(1)
            prefix = ~vm & real[:, -T:] & (pos[None, :] < last_vis[:, None])
            tok = {
                "all": ragged_positions(torch.ones_like(vm)),
                "text": ragged_positions(~vm),
                "vis": (v_idx, v_valid),
                "prefix": ragged_positions(prefix),
                "n_vis": n_vis,
                "max_vis": int(n_vis.max()) if B else 0,
            }
            ctx.scratch[key] = tok
        hollow = self.hollow and tok["max_vis"] > self.m.window
        ffn = self.ffn and tok["max_vis"] > 0 and self.m.ffn_keep < 1
        if not hollow and not ffn:
            return None  # nothing to reduce: the stock layer, bit for bit
        queries = self._hollow_groups(tok) if hollow else [QueryGroup(*tok["all"])]
        if ffn:
            v_idx, v_valid = tok["vis"]
            groups = [FFNGroup(*tok["text"]), FFNGroup(v_idx, v_valid, self._selector(ctx, tok))]
        else:
            groups = [FFNGroup(*tok["all"])]
        return LayerPlan(queries, groups)

    def _hollow_groups(self, tok):
        from methods._shared.reduced_layer import QueryGroup

        v_idx, v_valid = tok["vis"]
        p_idx, p_valid = tok["prefix"]
        W, Bq, V = self.m.window, self.m.hollow_block, tok["max_vis"]
        B = v_idx.shape[0]
        dev = v_idx.device
        groups = [QueryGroup(*tok["text"])]
        P = p_idx.shape[1]
        for a in range(0, V, Bq):
            n = min(Bq, V - a)
            lo = max(0, a - W + 1)
            k_vis = v_idx[:, lo : a + n]
            key_index = torch.cat([p_idx, k_vis], 1)
            key_valid = torch.cat([p_valid, v_valid[:, lo : a + n]], 1)
            r_q = torch.arange(a, a + n, device=dev)[:, None]
            r_k = torch.arange(lo, a + n, device=dev)[None, :]
            window = (r_k <= r_q) & (r_q - r_k < W)  # [n, nk]
            allow = torch.cat([torch.ones(n, P, dtype=torch.bool, device=dev), window], 1)
            groups.append(QueryGroup(v_idx[:, a : a + n], v_valid[:, a : a + n], key_index, key_valid,
                                     allow[None].expand(B, -1, -1)))
        return groups

    def _selector(self, ctx, tok):
        m, mlp, idx = self.m, self.layer.mlp, self.idx

        def select(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            B, _, D = z.shape
            n_vis = tok["n_vis"].tolist()
            ranks = [m.probe_ranks(n, idx).to(z.device) for n in n_vis]
            Mmax = max(1, max(len(r) for r in ranks))
            probe_idx = torch.zeros(B, Mmax, dtype=torch.long, device=z.device)
            probe_ok = torch.zeros(B, Mmax, dtype=torch.bool, device=z.device)
            for b, r in enumerate(ranks):
                probe_idx[b, : len(r)] = r
                probe_ok[b, : len(r)] = True
            zp = z.gather(1, probe_idx[..., None].expand(B, Mmax, D))
            h = mlp.act_fn(mlp.gate_proj(zp)) * mlp.up_proj(zp)  # [B, M, d_ff]
            score = (h.abs().float() * probe_ok[..., None]).sum(1) / probe_ok.sum(1, keepdim=True).clamp(min=1)
            K = m.ffn_channels(int(mlp.gate_proj.out_features))
            channels = score.topk(K, dim=-1).indices.sort(-1).values
            ctx.scratch[f"redundancylens_channels_{idx}"] = channels
            return channels

        return select


# ---- ranking objective built on the model ------------------------------------------------------------------
def kl_evaluator(model, adapter, batches, reduction: str, **params):
    """`evaluate(layers) -> {"agreement": exp(-mean KL)}` for `greedy_layer_ranking`: the mean KL divergence
    of the last-token distribution of the model with `reduction` ("hollow" | "ffn") on `layers` from the
    unreduced model, over `batches` (left-padded model-input dicts). A cheap stand-in for the paper's
    validation accuracy ([INF], spec B8.4 pre-filter); higher is better, 1.0 = unchanged."""
    from methods._shared.calibration import _last_logprobs, _model_inputs
    from methods._shared.reduced_layer import unpatch_layer

    if reduction not in ("hollow", "ffn"):
        raise MethodError(f"kl_evaluator: reduction must be 'hollow' or 'ffn', got {reduction!r}")
    batches = [_model_inputs(b, adapter) for b in batches]
    if not batches:
        raise MethodError("calibration set is empty (no batches given)")
    base = [_last_logprobs(model, b) for b in batches]

    def evaluate(layers):
        method = RedundancyLens(**{f"{reduction}_layers": list(layers)}, **params)
        method.check_params()
        method.apply(model, adapter)
        try:
            kl, n = 0.0, 0
            for b, logp in zip(batches, base):
                logq = _last_logprobs(model, b)
                kl += float((logq.exp() * (logq - logp)).sum())
                n += logp.shape[0]
        finally:
            for i in layers:
                unpatch_layer(adapter.llm_layers[i])
        return {"agreement": math.exp(-kl / n)}

    return evaluate
