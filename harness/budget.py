"""Equal-budget comparison: map one common budget to each method's own parameters.

A budget (config key `budget`) is given as

* `kind: tokens` — **the visual tokens that reach the LLM, per prompt**: all images, all crops and
  LLaVA-NeXT's `image_newline` tokens together (the count after the method's last reduction, e.g.
  after FiCoCo-L's last merge layer). `value` > 1 is that count, `value` in (0, 1] a share of the
  prompt's visual tokens as the processor inserted them (`prompt_count`: `round(value * N)`). The rule
  is applied to every prompt at run time, so prompts with more images, crops or another image size get
  the same count (or share). Token methods take it through `Method.budget_token_params` (random / FastV:
  `keep` / `keep_ratio`; FiCoCo-L: `final_tokens` / `final_ratio`; ToMe, FiCoCo-V, FiCoCo-VL:
  `prompt_tokens`); they all deliver the same count, except that vision-side methods give every crop of a
  prompt the same k and so land within crops/2 tokens of it (one token per crop at most); a vision-side
  method that cannot leave fewer than some k per crop on the model's tower (ToMe on a shallow one) refuses a
  count at validation, since a prompt with more images would need fewer. Methods without
  a token parameter (layer-wise methods) get the FLOPs that a token method keeping that many tokens in
  the LLM would cost on the reference prompt, and are solved as a FLOPs budget;
* `kind: flops` — prefill FLOPs as a ratio to `none` (`value` in (0, 1]), all components counted;
* `kind: null` — the method's own parameters (`method.params`), untouched.

The reference prompt (`layout_for`) is the model's default one-image prompt (`vtbench-flops`'s: LLaVA-1.5
one image, LLaVA-NeXT a 672x672 image) with `text_tokens` text tokens. A FLOPs budget is solved on it
through the analytic formulas (`harness.efficiency.flops.analytic_prefill`, the same formulas the
counted FLOPs are checked against): every candidate value of the method's `budget_param` that passes the
method's own validation is priced, and the one whose FLOPs ratio is closest to the target wins (ties:
the larger compute). The record keeps the budget, the resolved parameters and `visual_tokens_to_llm` on
the reference prompt; the efficiency probe records the count delivered on the probe prompts.
"""
from __future__ import annotations

import math
from typing import Any

from harness.budget_note import BUDGET_TOLERANCE, budget_note  # noqa: F401 - the rule lives there (light to import)
from harness.efficiency import analytic as A

KINDS = (None, "tokens", "flops")
#: BUDGET_TOLERANCE (harness.budget_note): a FLOPs-matched budget whose closest setting misses its target by more
#: than this is not met: the run warns (one line, before the model loads) and the report flags the row


class BudgetError(ValueError):
    """A budget that cannot be met or is malformed; one line."""


def check(budget: dict | None) -> None:
    if not budget or budget.get("kind") is None:
        return
    kind, value = budget.get("kind"), budget.get("value")
    if kind not in KINDS:
        raise BudgetError(f"budget.kind must be tokens, flops or null, got {kind!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget.value={value}: must be a positive finite number")
    if kind == "flops" and value > 1:
        raise BudgetError(f"budget.value for a FLOPs budget is a ratio in (0, 1], got {value}")
    if kind == "tokens" and value > 1 and value != int(value):
        raise BudgetError(
            f"budget.value={value}: a token budget above 1 is a count of visual tokens and must be a whole "
            f"number (a share is a value in (0, 1])"
        )


def layout_for(adapter, text_tokens: int) -> A.TokenLayout:
    """The reference prompt budgets are priced on: the model's default image (one crop for LLaVA-1.5,
    `flops.default_image_hw` for LLaVA-NeXT), `text_tokens` text tokens around it."""
    from harness.efficiency.flops import synthetic_layout

    return synthetic_layout(adapter.model.config, text_before=1, text_after=max(0, text_tokens - 1))


def _total(config, layout, method) -> int:
    from harness.efficiency.flops import analytic_prefill

    return sum(analytic_prefill(config, layout, method=method).values())


def prompt_count(value: float, n_visual: int) -> int:
    """The budget rule, per prompt: visual tokens reaching the LLM for a prompt whose processor inserted
    `n_visual` of them (all images, all crops, LLaVA-NeXT newline tokens included). `value` <= 1 is a
    share (`round(value * n_visual)`), `value` > 1 a count (at most `n_visual`: a prompt with fewer
    visual tokens keeps them all)."""
    k = int(round(float(value) * n_visual)) if float(value) <= 1 else int(value)
    return max(0, min(k, int(n_visual)))


#: whole-number token budgets in this range read like a percent typed as a count (`budget.value=50` for 50 %)
PERCENT_LIKE = (2, 100)


def percent_like_warning(budget: dict | None, n_visual: int) -> str | None:
    """The one warning line for a token budget that looks like a percent typed as a count: `budget.kind=tokens`
    with a whole number 2..100 that is at most the reference prompt's `n_visual` visual tokens (a count above
    them is refused anyway); None otherwise. It is still a count: the warning only says so."""
    if not budget or budget.get("kind") != "tokens" or budget.get("value") is None:
        return None
    v = float(budget["value"])
    if not (v.is_integer() and PERCENT_LIKE[0] <= v <= PERCENT_LIKE[1] and v <= n_visual):
        return None
    return (f"vtbench: warning: budget.value={v:g}: budget.kind=tokens counts visual tokens, so this keeps {v:g} of "
            f"the reference prompt's {n_visual} ({100 * v / n_visual:.1f} %); for {v:g} % write budget.value={v / 100:g}")


def tokens_to_count(value: float, n_visual: int) -> int:
    k = int(round(value * n_visual)) if value <= 1 else int(value)
    if k > n_visual:
        raise BudgetError(
            f"budget of {k} visual tokens exceeds the {n_visual} visual tokens of the model's reference prompt"
        )
    return max(k, 0)


def budget_keys(method, budget: dict | None) -> dict[str, Any]:
    """The method parameters a budget sets or clears, as `{dotted key under method.params: value}`; the
    value is what the budget sets whatever its size (None, "auto") or `VARIES` (the budget's solution).
    Compositions name their token-dropping member's keys (`members.<i>.params.<key>`). Empty without a
    budget or for a method the budget cannot act on."""
    if not budget or budget.get("kind") is None or method.name == "none":
        return {}
    if method.name == "compose":
        drop = method.drop_member
        i = [m.get("name") for m in method.members].index(drop.name)
        return {f"members.{i}.params.{k}": v for k, v in budget_keys(drop, budget).items()}
    kind, value = budget.get("kind"), budget.get("value")
    if kind == "tokens" and method.budget_tokens_param:
        probes = [method.budget_token_params(v) for v in (value, 0.5, 2)]
    elif method.budget_param:
        probes = [method.budget_params(v) for v in (1, 2)]
    else:
        return {}
    out: dict[str, Any] = {}
    for p in probes:
        for k, v in p.items():
            out[k] = v if k not in out or out[k] == v else VARIES
    for k in out:
        if any(k not in p for p in probes):
            out[k] = VARIES
    for k in getattr(method, "budget_ignores", ()):
        out.setdefault(k, IGNORED)
    return out


#: `budget_keys`' value of a parameter the budget solves for (it depends on the budget's size)
VARIES = object()
#: `budget_keys`' value of a parameter the budget does not set but makes unused (`Method.budget_ignores`)
IGNORED = object()


def resolve(method, adapter, budget: dict | None) -> tuple[Any, dict]:
    """Return `(method with budget applied, info)`; `info` records target and predicted FLOPs."""
    import dataclasses

    import methods as registry
    from methods import MethodError

    if not budget or budget.get("kind") is None:
        return method, {}
    check(budget)
    kind, value = budget["kind"], float(budget["value"])
    layout = layout_for(adapter, int(budget.get("text_tokens") or 64))
    config = adapter.model.config
    n = layout.visual
    base = method.params()
    dense = _total(config, layout, None)
    info: dict[str, Any] = {"kind": kind, "value": value, "layout": dataclasses.asdict(layout)}

    if method.name == "none":
        raise BudgetError("method none has no budget (it is the reference); drop budget.kind")
    if getattr(method, "no_budget", None):
        raise BudgetError(f"method {method.name!r} takes no budget ({method.no_budget}); drop budget.kind")

    def build(v):
        params = dict(base, **method.budget_params(v))
        m = registry.build(method.name, params)
        m.validate(adapter)
        return m

    if kind == "tokens":
        k = tokens_to_count(value, n)
        info["visual_tokens"] = k
        if method.budget_tokens_param:
            try:
                m = build_tokens(registry, method, base, value, adapter)
            except MethodError as e:
                raise BudgetError(f"{method.name} cannot keep {k} visual tokens: {e}") from None
            info["visual_tokens_to_llm"] = m.visual_tokens_kept(layout)
            info["predicted_flops_ratio"] = _total(config, layout, m) / dense
            return m, info
        target = _total(config, layout.with_visual(k), None) / dense
    else:
        target = value
    if not method.budget_param:
        raise BudgetError(f"method {method.name!r} has no budget parameter")
    best = None
    for v in method.budget_candidates(adapter):
        try:
            m = build(v)
        except MethodError:
            continue
        ratio = _total(config, layout, m) / dense
        score = (abs(ratio - target), -ratio)
        if best is None or score < best[0]:
            best = (score, m, ratio, v)
    if best is None:
        raise BudgetError(f"no setting of {method.name}.{method.budget_param} is valid for this model")
    info.update({"target_flops_ratio": target, "predicted_flops_ratio": best[2], "knob": {method.budget_param: best[3]}})
    info["visual_tokens_to_llm"] = best[1].visual_tokens_kept(layout)
    return best[1], info


def build_tokens(registry, method, base: dict, value: float, adapter):
    """`method` with the per-prompt token budget `value` (a count > 1 or a share <= 1)."""
    params = dict(base, **method.budget_token_params(value))
    m = registry.build(method.name, params)
    m.validate(adapter)
    return m
