"""The method interface: one small `apply(model, adapter)` per method.

A method is a dataclass of its parameters. `validate(adapter)` checks them against a model's
architecture (it only reads configs and module shapes, so it runs on a meta-device copy before any
weights load); `apply(model, adapter)` patches that one model instance in place and returns it, still a
Hugging Face model whose `generate` works.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


def drop_key_defaults(cls, params: dict) -> dict:
    """`params` without the entries that sit at their `Method.key_defaults` value."""
    kd = getattr(cls, "key_defaults", None) or {}
    return {k: v for k, v in params.items() if not (k in kd and _same(v, kd[k]))}


def identity_params(cls, params: dict) -> dict:
    """The parameters a cell's key is made of (`harness.results.cell_identity`): `params` without those at
    their `Method.key_defaults` value (added later, reproducing the earlier behaviour), with those of
    `Method.key_explicit` filled in when absent (their default changed the behaviour, so a config that does
    not spell them out must not share the earlier key), and a composition's members treated the same way."""
    out = {k: v for k, v in drop_key_defaults(cls, params).items()}
    for k, v in (getattr(cls, "key_explicit", None) or {}).items():
        out.setdefault(k, v)
    members = out.get("members")
    if isinstance(members, (list, tuple)):
        import methods as registry

        fixed = []
        for m in members:
            try:
                mcls = registry.get(m["name"])
                fixed.append(dict(m, params=identity_params(mcls, dict(m.get("params") or {}))))
            except (TypeError, KeyError, registry.MethodError):
                fixed.append(m)  # a malformed member is refused elsewhere, in one line
        out["members"] = fixed
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # `layer: false` is not `layer: 0`
    return a == b


class MethodError(ValueError):
    """A method parameter is invalid, or invalid for the loaded model. Message is one line."""


#: the LLaVA families (CLIP tower with a CLS token, fixed patch grid per image or crop)
LLAVA_FAMILIES = ("llava", "llava_next")
#: families with a decoder-only LLM the shared LLM machinery (`llm_reduce`, `reduced_layer`) acts on:
#: LLaVA's RoPE and Qwen2-VL / Qwen2.5-VL's M-RoPE (whose per-token cos/sin are sliced like RoPE's)
LLM_SIDE_FAMILIES = LLAVA_FAMILIES + ("llava_onevision", "qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass
class Method:
    name: ClassVar[str] = "base"
    #: model families this method can act on
    families: ClassVar[tuple[str, ...]] = LLAVA_FAMILIES
    #: why the method refuses a family it does not list (one line each; the refusal names it)
    refusals: ClassVar[dict[str, str]] = {}
    #: True if the method only simulates the saving (masks instead of skipping compute)
    simulated: ClassVar[bool] = False
    #: False if the patched model reads tensor *values* while it runs (the visual-token positions from
    #: `input_ids`, scores, ``.item()``): it cannot run on the meta device, so `vtbench-flops` gives the
    #: method's analytic numbers on full-size configs without a doomed meta forward first (a test checks
    #: the flag against a real meta forward for every method)
    meta_countable: ClassVar[bool] = True
    #: budgets (harness.budget): the parameter that takes a number of visual tokens directly, if any,
    #: and the parameter a FLOPs budget is solved over (its candidates from `budget_candidates`)
    budget_tokens_param: ClassVar[str | None] = None
    budget_param: ClassVar[str | None] = None
    #: parameters that any budget makes unused (the budget's own parameters take precedence over them):
    #: set by the user together with a budget they would be silently ignored, so that is refused
    budget_ignores: ClassVar[tuple[str, ...]] = ()
    #: parameters naming a calibration artefact (layer rankings) for "auto" layer lists; a cell of such a
    #: method carries its calibration settings and the artefacts' content in its identity
    calibration_fields: ClassVar[tuple[str, ...]] = ()
    #: conformance contract (tests/methods/test_conformance.py holds every registered method to it):
    #: parameter values that make the method a documented no-op (logits identical to the unpatched
    #: model), or None if it has none
    noop: ClassVar[dict | None] = None
    #: parameter values at which the method really reduces on the project's tiny random models
    #: (tests/methods/helpers.py: 64 visual tokens per image/crop, 4 LLM layers, 5 CLIP layers), or None
    #: for a method that never reduces (`none`); the suite builds `methods.build(name, example)` on every
    #: family in `families`
    example: ClassVar[dict | None] = None
    #: a multi-stage method (PyramidDrop, SparseVLM) whose token budget counts the visual tokens after its
    #: FIRST drop (`visual_tokens_kept` reports that count; later stages follow the method's own schedule);
    #: False: the count that reaches the LLM's last layer
    budget_at_first_drop: ClassVar[bool] = False
    #: why the method takes no budget at all (`blind`: it keeps no visual token), or None; a budget given
    #: to it is refused in one line with this reason (harness.budget)
    no_budget: ClassVar[str | None] = None
    #: parameters added after cells were recorded, with the value that reproduces the earlier behaviour:
    #: at that value they are left out of `params()` and of the cell key (`harness.results.cell_identity`),
    #: so existing records keep their keys and rows
    key_defaults: ClassVar[dict[str, Any]] = {}
    #: parameters whose default changed the method's behaviour: absent from a config (e.g. a composition
    #: member's), they still enter the cell key with their default, so no earlier record is served for them
    key_explicit: ClassVar[dict[str, Any]] = {}

    @classmethod
    def calibration_given(cls, params: dict) -> dict[str, Any]:
        """Calibration artefacts named in `params` ({field: path}); compositions prefix their members'."""
        return {f: params.get(f) for f in cls.calibration_fields if params.get(f)}

    @classmethod
    def may_calibrate(cls, params: dict) -> bool:
        """True if a cell with `params` may take layers from a calibration artefact."""
        return bool(cls.calibration_fields)

    def params(self) -> dict[str, Any]:
        return drop_key_defaults(type(self), dataclasses.asdict(self))

    def check_params(self) -> None:
        """Model-independent range checks; raise MethodError."""

    def validate(self, adapter) -> None:
        """Checks against a model (family, layer counts, token budgets); raise MethodError."""
        if adapter.family not in self.families:
            if adapter.family in self.refusals:
                raise MethodError(f"method {self.name!r} refuses model family {adapter.family!r}: "
                                  f"{self.refusals[adapter.family]}")
            raise MethodError(
                f"method {self.name!r} is not applicable to model family {adapter.family!r} "
                f"(supports: {', '.join(self.families)})"
            )

    def check_run(self, run: dict) -> None:
        """Checks against the run's settings (`run.batch_size`, `run.efficiency.enabled`, ...), at validation
        before anything loads; raise MethodError (one line, led by the key). Default: none."""

    def require_full_attention(self, adapter) -> None:
        """Refuse (one line) a language model with sliding-window attention: the shared LLM machinery
        (`llm_reduce`, `reduced_layer`) builds full causal masks and scores for the layers it changes."""
        window = getattr(adapter, "sliding_window", None)
        if window:
            raise MethodError(
                f"method {self.name!r} does not follow sliding-window attention (this language model attends "
                f"through a {window}-token window); use a model without one or a vision-side method"
            )

    def apply(self, model, adapter):
        """Patch `model` in place (this instance only) and return it."""
        raise NotImplementedError

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        """MACs of one prefill with this method applied, per component (vision, projector, llm,
        lm_head), composed from `harness.efficiency.analytic` primitives. fvcore's count of the
        patched model must equal this exactly (tests check it)."""
        from harness.efficiency.analytic import dense_prefill_macs

        return dense_prefill_macs(shapes, layout)

    # ---- per-layer FLOPs terms (compositions, `methods/compose.py`, add these up) ------------------------
    def llm_visual_schedule(self, shapes, layout) -> tuple[list[int], int] | None:
        """For a method that removes visual tokens *inside* the LLM: the visual tokens alive at the
        input of every decoder layer for one prompt `layout`, and the MACs of its selection itself
        (e.g. FastV's score row). None for methods that do not drop tokens between layers."""
        return None

    def llm_layer_macs_at(self, s, layer: int, layout) -> int:
        """MACs of decoder layer `layer` (LLM shape `s`) run on the tokens of `layout` (the visual
        tokens alive at that layer). Layer-wise methods (ShortV, RedundancyLens) override it; their
        `analytic_prefill_macs` is the sum of it over the layers."""
        from harness.efficiency.analytic import llm_layer_macs

        return llm_layer_macs(s, layout.total)

    def visual_tokens_to_llm(self, n_visual: int) -> int:
        """Visual tokens entering the LLM for an input with `n_visual` of them (vision-side methods
        reduce it)."""
        return n_visual

    def visual_tokens_kept(self, layout) -> int:
        """Visual tokens that reach the LLM's last layer for one prompt `layout` (a `TokenLayout` with
        the processor's visual-token count): the count a token budget (`harness.budget`) is about.
        Methods that remove or merge visual tokens override it; the others keep them all."""
        return int(layout.visual)

    def budget_token_params(self, value: float) -> dict:
        """Parameters that make every prompt deliver `harness.budget.prompt_count(value, n_visual)`
        visual tokens to the LLM (value <= 1: a share, > 1: a count); default: `budget_tokens_param`
        set to the count (methods whose parameter means something else override this)."""
        return {self.budget_tokens_param: int(value) if float(value) > 1 else float(value)}

    def budget_candidates(self, adapter) -> list:
        """Values of `budget_param` worth trying for this model (default: every visual-token count)."""
        return list(range(0, adapter.visual_tokens_per_image + 1))

    def budget_params(self, value) -> dict:
        """Parameters that set the budget knob to `value` (default: `{budget_param: value}`)."""
        return {self.budget_param: value}

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({p})"
