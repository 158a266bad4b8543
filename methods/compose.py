"""`compose` — several methods applied to one model, built from the members' own code and formulas.

Two of the seed papers combine a layer-wise method with token pruning: ShortV Table 5 (ShortV + FastV
on LLaVA-1.5-7B) and RedundancyLens' "+ FastV" rows. A composition is a list of member method configs,

    method=compose method.params.members='[{name: shortv, params: {layers: [31, 29]}}, {name: fastv, params: {K: 2, R: 0.5}}]'

(or a named config: `method=shortv_fastv`, `method=redundancylens_fastv`, conf/method/*.yaml).

Defined compositions (anything else is refused in one line, naming the rule):

* exactly one **layer-wise** member (`shortv`, `redundancylens`: they replace the forward of chosen
  decoder layers, `methods._shared.reduced_layer`) and one **LLM token-dropping** member (`fastv`,
  `random`: `methods._shared.llm_reduce` drops visual tokens between decoder layers), listed in that
  order (the layer-wise member first, as in the papers' "ShortV + FastV").
* Interaction: the token-dropping member drops visual tokens at its layer (FastV: at layer K, scored at
  layer K-1; random: before layer `layer`, 0 by default); a layer-wise layer before that point acts on all visual tokens, a
  layer-wise layer at or after it acts on the *kept* visual tokens only (its reduced layer runs inside the
  dropping machinery, which narrows the visual-token bookkeeping to the kept tokens:
  `methods._shared.context.narrowed`). ShortV's frozen layers then freeze the kept visual tokens,
  RedundancyLens' windows and probes are over the kept visual tokens (in their visual rank).
* Refused: two members of the same kind (two layer-wise methods would patch the same decoder layers;
  one LLM reducer per model), a member that reduces FastV's scoring layer K-1 in its queries (ShortV
  frozen or RedundancyLens Hollow layer K-1: FastV scores from that layer's full query projection),
  FiCoCo-L / FiCoCo-VL (their merge layers run from their submodules and would bypass a reduced layer),
  vision-side members (ToMe, FiCoCo-V: not defined yet; FiCoCo-VL is the vision + LLM composition),
  `none` and nested compositions.

Everything else follows the members: the no-op is the members' no-ops (identity); analytic FLOPs are the
layer-wise member's per-layer formula (`llm_layer_macs_at`) evaluated at the dropping member's visual-token
schedule (`llm_visual_schedule`) plus its selection cost; budgets (`budget.kind=tokens|flops`) are solved
over the token-dropping member's token parameter (FastV / random `keep`, `keep_ratio`), the layer-wise
member's parameters stay as given; calibration ('auto' layers) is done per member.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from methods import register
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError
from methods.fastv import FastV
from methods.random_drop import RandomDrop
from methods.redundancylens import RedundancyLens
from methods.shortv import ShortV

LAYER_WISE = ("shortv", "redundancylens")
TOKEN_DROPPING = ("fastv", "random")
_MEMBER_CLASSES = {"shortv": ShortV, "redundancylens": RedundancyLens, "fastv": FastV, "random": RandomDrop}


def member_families() -> tuple[str, ...]:
    """The families a composition can act on, derived from its members: those on which some layer-wise
    member and some token-dropping member both act (a composition of members that do not both act on a
    family is refused there by the member's own one-line check, `validate`)."""
    def acts(names, family):
        return any(family in _MEMBER_CLASSES[n].families for n in names)

    return tuple(f for f in LLM_SIDE_FAMILIES if acts(LAYER_WISE, f) and acts(TOKEN_DROPPING, f))
_WHY_NOT = {
    "ficoco_l": "its merge layers run from their submodules and would bypass a layer-wise member's reduced layer",
    "ficoco_vl": "it is itself a (vision + LLM) composition whose merge layers bypass reduced layers",
    "tome": "vision-side members are not defined in a composition yet (FiCoCo-VL is the vision + LLM one)",
    "ficoco_v": "vision-side members are not defined in a composition yet (FiCoCo-VL is the vision + LLM one)",
    "none": "it does nothing; leave it out",
    "compose": "compositions do not nest; list the members directly",
}


@register
@dataclasses.dataclass
class Compose(Method):
    name = "compose"
    families = member_families()  # derived from the members (was LLaVA only: Qwen2-VL, OneVision refused)
    noop = {"members": [{"name": "shortv", "params": {"layers": []}}, {"name": "fastv", "params": {"R": 0.0}}]}
    example = {"members": [{"name": "shortv", "params": {"layers": [3, 0]}}, {"name": "fastv", "params": {"K": 2, "keep_ratio": 0.5}}]}
    meta_countable = False  # the members find the visual tokens from input_ids values

    #: member method configs, in order: [{name: <layer-wise>, params: {...}}, {name: <token-dropping>, params: {...}}]
    members: list[dict] = dataclasses.field(default_factory=list)

    # ---- members -------------------------------------------------------------------------------------
    def check_params(self) -> None:
        self._built = None
        self._build_members()

    def _build_members(self) -> list[Method]:
        built = getattr(self, "_built", None)
        if built is not None:
            return built
        import methods

        if not isinstance(self.members, (list, tuple)) or not self.members:
            raise MethodError("compose: members must be a non-empty list of {name: <method>, params: {...}}")
        out = []
        for i, spec in enumerate(self.members):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise MethodError(f"compose: members[{i}] must be a mapping {{name: <method>, params: {{...}}}}, got {spec!r}")
            extra = sorted(set(spec) - {"name", "params"})
            if extra:
                raise MethodError(f"compose: members[{i}] has unknown key(s) {', '.join(extra)} (only name, params)")
            name = spec["name"]
            if name in _WHY_NOT:
                raise MethodError(f"compose: member {name!r} is not allowed: {_WHY_NOT[name]}")
            if name not in LAYER_WISE + TOKEN_DROPPING:
                methods.get(name)  # unknown names: the registry's message
                raise MethodError(f"compose: member {name!r} is not allowed (members: {', '.join(LAYER_WISE + TOKEN_DROPPING)})")
            params = spec.get("params") or {}
            if not isinstance(params, dict):
                raise MethodError(f"compose: members[{i}].params must be a mapping, got {params!r}")
            try:
                out.append(methods.build(name, params))
            except MethodError as e:
                msg = str(e)
                key = re.match(r"method\.params\.([^=]+)=", msg)
                if key:  # name the member's key: method.params.members.<i>.params.<key>=<value>
                    head, _, rest = msg.partition(": ")
                    raise MethodError(f"method.params.members.{i}.params.{head[len('method.params.'):]}: "
                                      f"compose: members[{i}] ({name}): {rest}") from None
                raise MethodError(f"compose: members[{i}] ({name}): {msg}") from None
        names = [m.name for m in out]
        layer = [n for n in names if n in LAYER_WISE]
        drop = [n for n in names if n in TOKEN_DROPPING]
        if len(layer) > 1:
            raise MethodError(f"compose: two layer-wise members ({', '.join(layer)}) would patch the same decoder layers; give one")
        if len(drop) > 1:
            raise MethodError(f"compose: two token-dropping members ({', '.join(drop)}): one LLM reducer per model; give one")
        if len(out) != 2:
            raise MethodError(
                f"compose: give one layer-wise member ({' | '.join(LAYER_WISE)}) and one token-dropping member "
                f"({' | '.join(TOKEN_DROPPING)}), got {names}"
            )
        if names[0] not in LAYER_WISE:
            raise MethodError(
                f"compose: list the layer-wise member first ({names[1]} + {names[0]}): the order is "
                "layer-wise, then token dropping"
            )
        self._built = out
        return out

    @property
    def layer_member(self) -> Method:
        return self._build_members()[0]

    @property
    def drop_member(self) -> Method:
        return self._build_members()[1]

    def member_params(self) -> list[dict]:
        """The members as {name, params} with every parameter resolved (defaults filled in)."""
        return [{"name": m.name, "params": m.params()} for m in self._build_members()]

    def _with_drop(self, params: dict) -> dict:
        """`members` with the token-dropping member's parameters updated by `params`."""
        layer, drop = self.member_params()
        drop = {"name": drop["name"], "params": dict(drop["params"], **params)}
        return {"members": [layer, drop]}

    def describe(self) -> str:
        return " + ".join(m.describe() for m in self._build_members())

    # ---- checks and apply ------------------------------------------------------------------------------
    def validate(self, adapter) -> None:
        super().validate(adapter)
        layer, drop = self._build_members()
        for m in (layer, drop):
            m.validate(adapter)
        self._check_scoring_layer(adapter.num_llm_layers)

    def _query_reduced_layers(self, num_layers: int) -> list[int] | None:
        """Layers where the layer-wise member computes queries for a subset of tokens (None: unknown yet,
        'auto' layers before calibration)."""
        m = self.layer_member
        if m.name == "shortv":
            if m.layers == "auto" and not m.calibration:
                return None
            return m.frozen_layers(num_layers)
        if m.hollow_layers == "auto" and not m.calibration_hollow:
            return None
        return m.resolved_layers(num_layers)[0]

    def _check_scoring_layer(self, num_layers: int) -> None:
        drop = self.drop_member
        if drop.name != "fastv" or drop._noop():
            return
        reduced = self._query_reduced_layers(num_layers)
        if reduced is not None and drop.K - 1 in reduced:
            what = "freezes" if self.layer_member.name == "shortv" else "puts Hollow Attention on"
            raise MethodError(
                f"compose: {self.layer_member.name} {what} layer {drop.K - 1}, FastV's scoring layer (K-1 with K={drop.K}): "
                "FastV scores from that layer's full query projection; choose another K or leave that layer out"
            )

    def apply(self, model, adapter):
        self.validate(adapter)
        layer, drop = self._build_members()
        # the reduced layers are patched first, so that the dropping machinery wraps them and calls them
        # with the kept tokens (see the module docstring)
        layer.apply(model, adapter)
        drop.apply(model, adapter)
        return model

    # ---- tokens and FLOPs ------------------------------------------------------------------------------
    def visual_tokens_kept(self, layout) -> int:
        return self.drop_member.visual_tokens_kept(layout)

    def visual_tokens_to_llm(self, n_visual: int) -> int:
        return self.drop_member.visual_tokens_to_llm(n_visual)

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        """The token-dropping member's FLOPs with its LLM term recomputed per layer: the layer-wise
        member's per-layer formula at the visual tokens alive at that layer, plus the dropping member's
        selection cost."""
        layer, drop = self._build_members()
        macs = dict(drop.analytic_prefill_macs(shapes, layout))
        s = shapes.llm
        schedule = drop.llm_visual_schedule(shapes, layout)
        per_layer, extra = schedule if schedule is not None else ([layout.visual] * s.layers, 0)
        macs["llm"] = sum(layer.llm_layer_macs_at(s, i, layout.with_visual(v)) for i, v in enumerate(per_layer)) + extra
        return macs

    # ---- budgets: the token-dropping member's token parameter ------------------------------------------
    @property
    def budget_tokens_param(self) -> str | None:  # type: ignore[override]
        drop = self.drop_member
        return f"{drop.name}.{drop.budget_tokens_param}" if drop.budget_tokens_param else None

    @property
    def budget_param(self) -> str | None:  # type: ignore[override]
        drop = self.drop_member
        return f"{drop.name}.{drop.budget_param}" if drop.budget_param else None

    def budget_token_params(self, value: float) -> dict:
        return self._with_drop(self.drop_member.budget_token_params(value))

    def budget_candidates(self, adapter) -> list:
        return self.drop_member.budget_candidates(adapter)

    def budget_params(self, value) -> dict:
        return self._with_drop(self.drop_member.budget_params(value))

    # ---- calibration: per member ------------------------------------------------------------------------
    @classmethod
    def calibration_given(cls, params: dict) -> dict[str, Any]:
        import methods

        out = {}
        for i, spec in enumerate(params.get("members") or []):
            try:
                member = methods.get(spec["name"])
            except Exception:
                continue
            for k, v in member.calibration_given(spec.get("params") or {}).items():
                out[f"members.{i}.{spec['name']}.{k}"] = v
        return out

    @classmethod
    def may_calibrate(cls, params: dict) -> bool:
        import methods

        for spec in params.get("members") or []:
            try:
                if methods.get(spec["name"]).may_calibrate(spec.get("params") or {}):
                    return True
            except Exception:
                continue
        return False
