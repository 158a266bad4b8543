"""The conformance checks every registered method is held to (tests/methods/test_conformance.py runs them
over the registry; tests/methods/test_conformance_hooks.py runs them on throw-away methods).

Each `check_*` function takes a method's registry name (and a model family) and raises AssertionError with
a one-paragraph message; where a property fails because the method lacks a hook, the message names the
hook (`Method.<hook>`). The contract they check (README "Add a method"):

| property                                   | hooks it needs                                                |
|--------------------------------------------|---------------------------------------------------------------|
| documented no-op == unpatched logits       | `noop` (class attribute), `apply`                             |
| cached greedy == uncached; batch == single | `example` (or `noop`), `apply`                                |
| counted FLOPs (fvcore) == analytic         | `analytic_prefill_macs` (+ `meta_countable` honest)           |
| visual tokens reaching the LLM == reported | `visual_tokens_kept` (what records, budgets, `vtbench-flops` use) |
| budget rule per prompt (1-3 images, NeXT)  | `budget_tokens_param` (+ `budget_token_params`); layer-wise:  |
|                                            | `budget_param` (+ `budget_candidates` / `budget_params`)      |
| bad parameters: one line, before load      | typed dataclass fields, `check_params`                        |
| families: declared == supported; refusals  | `families` (compositions: derived from members), `refusals`, |
|                                            | `validate`                                                    |

Models are the tiny random ones of tests/methods/helpers.py (64 visual tokens per image or crop, 4 LLM
layers, 5 CLIP layers), built once per process; a method applied with its `example` (or `noop`) is built
once per process and family too and shared by the checks that only run it.
"""
from __future__ import annotations

import copy
import functools
import json
import math

import torch

import methods
from harness.efficiency import flops as F
from harness.models import get_adapter
from harness.models.adapter import FAMILIES
from methods.base import Method, MethodError
from tests.methods import helpers as S

#: prompts of each family (image sizes (h, w) per prompt): several images so the visual tokens form
#: several spans; LLaVA-NeXT one image of 3 crops (batches need equal visual counts)
SIZES = {
    "llava": [(64, 64), (64, 64)],
    "llava_next": [(64, 128)],
    "qwen2_vl": [(84, 56), (64, 64)],
    "qwen2_5_vl": [(84, 56), (64, 64)],
    "llava_onevision": [(84, 56), (64, 64)],
}
TEXTS = ["What is shown?", "How many circles squares triangles stars are there? Answer with one word."]
#: prompt shapes of the budget rule: 1, 2 and 3 images (LLaVA-1.5) and LLaVA-NeXT images of two sizes
BUDGET_SHAPES = {
    "llava": [[(64, 64)], [(64, 64), (64, 64)], [(64, 64), (80, 64), (64, 64)]],
    "llava_next": [[(64, 128)], [(128, 64), (96, 64)]],
}
BUDGET_VALUES = (20, 0.3)  # a count (> 1) and a share (<= 1) of the prompt's visual tokens


# ---- models, methods, inputs (cached per process) ----------------------------------------------------
def tiny(family: str, num_layers: int = 4):
    """A fresh copy of the family's tiny model (5 CLIP layers; built once per process) and its processor."""
    return S.tiny(family, vision_layers=5, num_layers=num_layers)


def settings(name: str) -> tuple[str, dict]:
    """("example" | "noop", params) the run checks use: the method's example, or its no-op if it never
    reduces (`none`). A method declaring neither fails here, naming the attributes."""
    cls = methods.get(name)
    for which in ("example", "noop"):
        params = getattr(cls, which, None)
        if params is not None:
            assert isinstance(params, dict), f"{name}: Method.{which} must be a dict of parameters, got {params!r}"
            return which, copy.deepcopy(params)
    raise AssertionError(
        f"method {name!r} declares neither Method.example (parameters at which it reduces on the tiny models) "
        "nor Method.noop (parameters of its documented no-op); the conformance suite needs one of them"
    )


def build(name: str, which: str = "run") -> Method:
    if which == "run":
        which, params = settings(name)
    else:
        params = copy.deepcopy(getattr(methods.get(name), which))
    return methods.build(name, params)


_APPLIED: dict = {}


def applied(name: str, family: str):
    """(patched model, processor, method) of `name` at its `settings` on `family`, built once per process
    (the checks using it only run forwards and `generate`); a preset's (`use_preset`) instead."""
    if _PRESET.get(name) is not None:
        return _PRESET[name](family)
    key = (name, json.dumps(settings(name)[1], sort_keys=True, default=str), family)
    if key not in _APPLIED:
        model, proc = tiny(family)
        m = build(name)
        m.apply(model, get_adapter(model))
        _APPLIED[key] = (model, proc, m)
    return _APPLIED[key]


#: {name: family -> (model, processor, method)} while a preset is checked (`use_preset`)
_PRESET: dict = {}


class use_preset:
    """Within the block, the run checks (`check_cache`, `check_batch`, `check_flops`, `check_kept`) run
    `name` as the given `(model, processor, method)` (a preset applied by the test)."""

    def __init__(self, name, patched):
        self.name, self.patched = name, patched

    def __enter__(self):
        _PRESET[self.name] = lambda family: self.patched

    def __exit__(self, *exc):
        _PRESET.pop(self.name, None)


def prompts(family: str, n: int = 1, sizes=None):
    proc = tiny(family)[1]
    sizes = sizes or SIZES[family]
    return S.inputs(proc, [sizes] * n, TEXTS[:n])


def single(family: str, b: int, sizes=None):
    proc = tiny(family)[1]
    return S.inputs(proc, [sizes or SIZES[family]], [TEXTS[b]], first=b)


def _overrides(m: Method, hook: str) -> bool:
    """Does the method's class define `hook` itself (not Method's default)?"""
    return getattr(type(m), hook) is not getattr(Method, hook)


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, f"error is not one line: {text!r}"
    return text


# ---- what reaches the LLM, measured on the model (independent of the method's bookkeeping) -----------
def measured_visual(model, inputs, layout=None, method=None) -> tuple[int, int]:
    """(visual tokens entering the LLM, visual tokens the token budget counts) of a batch-1 prompt,
    measured as sequence lengths minus the prompt's text tokens: at the language model's input, and at its
    final norm (what reaches the last layer) -- or, for a multi-stage method whose budget is its first drop
    (`Method.budget_at_first_drop`: PyramidDrop, SparseVLM), at the output of the first decoder layer whose
    sequence is shorter than the input."""
    adapter = get_adapter(model)
    lm = adapter.language_model
    seen = {"layers": []}

    def at_input(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        seen.setdefault("in", x.shape[1])

    def at_norm(module, args):
        seen["out"] = args[0].shape[1]

    def at_layer(module, args, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        seen["layers"].append(h.shape[1])

    hooks = [lm.register_forward_pre_hook(at_input, with_kwargs=True), lm.norm.register_forward_pre_hook(at_norm)]
    hooks += [layer.register_forward_hook(at_layer) for layer in lm.layers]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    if layout is None:
        (layout,) = F.layouts_from_inputs(model, inputs)
    text = layout.total - layout.visual
    counted = seen["out"]
    if method is not None and type(method).budget_at_first_drop:
        counted = next((n for n in seen["layers"] if n < seen["in"]), seen["out"])
    return seen["in"] - text, counted - text


# ---- the properties ------------------------------------------------------------------------------------
def check_noop(name: str, family: str) -> None:
    """The documented no-op (`Method.noop`) gives logits identical to the unpatched model's."""
    cls = methods.get(name)
    assert cls.noop is not None, f"{name}: declares no no-op (Method.noop = None)"
    model, _ = tiny(family)
    inp = prompts(family, 2)
    with torch.no_grad():
        ref = model(**inp).logits[:, -1]
    build(name, "noop").apply(model, get_adapter(model))
    with torch.no_grad():
        out = model(**inp).logits[:, -1]
    assert torch.equal(out, ref), (
        f"{name} at its documented no-op Method.noop={cls.noop} changes the logits on {family} "
        f"(max |diff| {float((out - ref).abs().max()):.3g}): `apply` must leave the model identical there")


def greedy_uncached(model, inp, steps: int):
    """`steps` greedy tokens, each from a full forward without a cache; the generated tokens are marked as
    continuation (`llm_reduce.continuation`), so an in-LLM method scores from the last prompt token as
    the cached prefill did (also on a sequence a vision-side method shortened)."""
    from methods._shared import llm_reduce as LR

    ids, am, mm = inp["input_ids"], inp["attention_mask"], inp.get("mm_token_type_ids")
    extra = {k: v for k, v in inp.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    out = []
    with torch.no_grad():
        for j in range(steps):
            kw = dict(extra, **({"mm_token_type_ids": mm} if mm is not None else {}))
            with LR.continuation(model, j):
                logits = model(input_ids=ids, attention_mask=am, use_cache=False, **kw).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            mm = None if mm is None else torch.cat([mm, torch.zeros_like(nxt)], 1)
    return torch.cat(out, 1)


def check_cache(name: str, family: str, steps: int = 3) -> None:
    """Greedy decoding with the KV cache == recomputing every step without a cache."""
    model, _, _ = applied(name, family)
    inp = prompts(family)
    with torch.no_grad():
        cached = model.generate(**inp, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                eos_token_id=None)[:, inp["input_ids"].shape[1]:]
    uncached = greedy_uncached(model, inp, steps)
    assert torch.equal(cached, uncached), f"{name} on {family}: cached greedy {cached.tolist()} != uncached {uncached.tolist()}"


def check_batch(name: str, family: str, steps: int = 3) -> None:
    """A left-padded batch of two prompts == each prompt alone (tokens; logits within 1e-4)."""
    model, _, _ = applied(name, family)
    inp = prompts(family, 2)
    assert not bool(inp["attention_mask"].all())  # the shorter prompt is left-padded
    with torch.no_grad():
        both = model.generate(**inp, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              eos_token_id=None)[:, inp["input_ids"].shape[1]:]
        first = model(**inp).logits[:, -1]
    for b in range(2):
        one = single(family, b)
        with torch.no_grad():
            alone = model.generate(**one, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                   eos_token_id=None)[:, one["input_ids"].shape[1]:]
            logits = model(**one).logits[:, -1]
        assert torch.equal(both[b], alone[0]), f"{name} on {family}: prompt {b} in a padded batch {both[b].tolist()} != alone {alone[0].tolist()}"
        torch.testing.assert_close(first[b], logits[0], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name} on {family}: prompt {b} batch vs alone logits: {m}")


def check_flops(name: str, family: str) -> None:
    """fvcore's count of one prefill of the patched model == `analytic_prefill_macs` (x2), per component;
    at its example the method really saves compute."""
    model, _, m = applied(name, family)
    inp = prompts(family)
    (layout,) = F.layouts_from_inputs(model, inp)
    counted = F.count_prefill(model, inp).flops
    analytic = F.analytic_prefill(model.config, layout, None if name == "none" else m)
    dense = F.analytic_prefill(model.config, layout)
    if counted != analytic:
        if not _overrides(m, "analytic_prefill_macs"):
            raise AssertionError(
                f"{name} on {family}: counted prefill FLOPs {counted} != analytic {analytic}: the method does not "
                "define Method.analytic_prefill_macs (the default is the dense model's), so records and budgets "
                "would price it as the unmodified model")
        raise AssertionError(f"{name} on {family}: counted prefill FLOPs {counted} != Method.analytic_prefill_macs "
                             f"{analytic} (one of them is wrong)")
    if settings(name)[0] == "example" and name not in _PRESET:
        assert sum(counted.values()) < sum(dense.values()), (
            f"{name} on {family}: at Method.example={type(m).example} the counted FLOPs equal the dense model's; "
            "the example must really reduce on the tiny models")


def check_kept(name: str, family: str) -> None:
    """The visual tokens that reach the LLM's last layer (measured) == `visual_tokens_kept(layout)` (what
    records, budgets and `vtbench-flops` report), and the visual-token context agrees."""
    from methods._shared.context import get_context

    model, _, m = applied(name, family)
    inp = prompts(family)
    (layout,) = F.layouts_from_inputs(model, inp)
    _, out = measured_visual(model, inp, method=m)
    reported = m.visual_tokens_kept(layout)
    if out != reported:
        hint = ("the method does not define Method.visual_tokens_kept (the default reports every visual token)"
                if not _overrides(m, "visual_tokens_kept") else "Method.visual_tokens_kept is wrong for this prompt")
        raise AssertionError(f"{name} on {family}: {out} visual tokens reach the LLM's last layer (a multi-stage "
                             f"method with Method.budget_at_first_drop: its first drop) but the method "
                             f"reports {reported} of {layout.visual}: {hint}")
    ctx = get_context(model)
    if ctx is not None and ctx.visual_tokens_final is not None:
        assert ctx.visual_tokens_final == out, (name, family, ctx.visual_tokens_final, out)
    # `vtbench-flops` prints `visual_tokens_kept` of its synthetic prompt (harness/efficiency/flops_table.py):
    # the same prompt run through the patched model delivers that many
    from harness.efficiency.layouts import synthetic_inputs, synthetic_layout

    syn = synthetic_inputs(model.config, text_after=15, device="cpu")
    layout = synthetic_layout(model.config, text_after=15)
    _, out = measured_visual(model, syn, layout, method=m)
    printed = m.visual_tokens_kept(layout)
    assert out == printed, (f"{name} on {family}: vtbench-flops would print {printed} visual tokens reaching the "
                            f"LLM for its {layout.visual}-token prompt, the model delivers {out}: Method.visual_tokens_kept")


def check_meta(name: str, family: str = "llava") -> None:
    """`meta_countable` says what a prefill on the meta device does (vtbench-flops relies on it)."""
    from harness.efficiency.layouts import synthetic_inputs
    from harness.models.loading import meta_model

    config = tiny(family)[0].config
    model = meta_model(config)
    m = build(name)
    m.apply(model, get_adapter(model))
    try:
        F.count_prefill(model, synthetic_inputs(config))
        ok = True
    except RuntimeError as e:
        assert "meta" in str(e), f"{name}: a meta-device prefill failed for another reason: {e}"
        ok = False
    assert type(m).meta_countable == ok, (
        f"{name}: Method.meta_countable={type(m).meta_countable} but a prefill on the meta device "
        f"{'runs' if ok else 'fails (the method reads tensor values)'}")


def budget_families(name: str) -> list[str]:
    fams = [f for f in ("llava", "llava_next") if f in methods.get(name).families]
    return fams or list(methods.get(name).families[:1])


def check_budget(name: str, family: str) -> None:
    """`budget.kind=tokens` per prompt: at a count (20) and a share (0.3) the method either refuses the
    budget at validation in one line, or delivers `prompt_count(value, N)` visual tokens to the LLM on
    every prompt shape (1, 2, 3 images; NeXT images of two sizes): exactly when it reduces inside the LLM,
    within half a token per vision-encoder pass when it gives every crop the same count; and reports what
    it delivers (`visual_tokens_kept`). Methods without a token parameter (layer-wise) solve the budget
    over `budget_param`."""
    from harness import budget as B

    cls = methods.get(name)
    model, _ = tiny(family)
    adapter = get_adapter(model)
    if name == "none":
        try:
            B.resolve(build(name), adapter, {"kind": "tokens", "value": 0.3})
        except B.BudgetError as e:
            _one_line(e)
            return
        raise AssertionError("none: a budget must be refused (it is the reference)")
    example = build(name)
    example.validate(adapter)
    shapes = BUDGET_SHAPES.get(family, [SIZES[family]])
    layouts = [F.layouts_from_inputs(model, S.inputs(tiny(family)[1], [s]))[0] for s in shapes]
    reduces_tokens = settings(name)[0] == "example" and any(example.visual_tokens_kept(lay) < lay.visual for lay in layouts)
    if cls.no_budget:
        for value in BUDGET_VALUES:
            try:
                B.resolve(example, adapter, {"kind": "tokens", "value": value, "text_tokens": 16})
            except B.BudgetError as e:
                _one_line(e)
                continue
            raise AssertionError(f"{name} declares Method.no_budget ({cls.no_budget}) but budget.value={value} was "
                                 "accepted")
        return
    if not example.budget_tokens_param:
        assert not reduces_tokens, (
            f"{name} removes visual tokens but declares no Method.budget_tokens_param: budget.kind=tokens could "
            "not give it the per-prompt count every token method gets (set budget_tokens_param, and "
            "budget_token_params if its parameter is not a plain count / share)")
        assert example.budget_param, (
            f"{name} declares neither Method.budget_tokens_param nor Method.budget_param: budgets would say "
            f"'method {name!r} has no budget parameter'")
        for value in BUDGET_VALUES:
            try:
                B.resolve(example, adapter, {"kind": "tokens", "value": value, "text_tokens": 16})
            except B.BudgetError as e:  # refused in one line: allowed
                _one_line(e)
        return
    for value in BUDGET_VALUES:
        try:
            m = B.build_tokens(methods, example, example.params(), value, adapter)
        except (MethodError, B.BudgetError) as e:
            _one_line(e)  # refused at validation, in one line
            continue
        patched, _ = tiny(family)
        m.apply(patched, get_adapter(patched))
        for sizes, layout in zip(shapes, layouts):
            inp = S.inputs(tiny(family)[1], [sizes])
            entering, out = measured_visual(patched, inp, method=m)
            target = B.prompt_count(value, layout.visual)
            reported = m.visual_tokens_kept(layout)
            where = f"{name} on {family}, budget.value={value}, {len(sizes)} image(s) {sizes} ({layout.visual} visual tokens)"
            assert out == reported, f"{where}: {out} visual tokens reach the LLM's last layer, Method.visual_tokens_kept says {reported}"
            tol = 0 if entering == layout.visual else layout.images // 2
            assert abs(out - target) <= tol, (
                f"{where}: delivers {out} visual tokens, the budget rule asks {target} (tolerance {tol}); "
                "Method.budget_token_params must give every prompt its count, or validate must refuse the budget")


#: bad values of each parameter type (the shared checks in `methods.build` and the method's `check_params`)
def _bad_values(hint) -> list:
    text = str(hint)
    out = [math.nan]
    if "int" in text or "float" in text:
        out.append("abc")
    return out


def check_bad_params(name: str) -> None:
    """Every parameter given NaN (and numbers given a string) is refused by `methods.build` (no model
    needed) with one line naming the key."""
    import dataclasses
    import typing

    cls = methods.get(name)
    hints = typing.get_type_hints(cls)
    base = settings(name)[1]
    for f in dataclasses.fields(cls):
        for bad in _bad_values(hints.get(f.name)):
            params = dict(base, **{f.name: bad})
            try:
                methods.build(name, params)
            except MethodError as e:
                text = _one_line(e)
                assert f.name in text, f"{name}: the error for {f.name}={bad!r} does not name the key: {text}"
                continue
            raise AssertionError(f"{name}: {f.name}={bad!r} is accepted by methods.build "
                                 "(Method.check_params / the field's type annotation must refuse it)")


def member_families(name: str) -> tuple[str, ...] | None:
    """For a composition (parameters naming `members`): the families every member supports."""
    params = settings(name)[1]
    members = params.get("members") if isinstance(params, dict) else None
    if not members:
        return None
    fams = set(FAMILIES)
    for spec in members:
        fams &= set(methods.get(spec["name"]).families)
    return tuple(f for f in FAMILIES if f in fams)


def check_families(name: str) -> None:
    """Declared families are known and supported (the method validates on each); a composition declares
    what its members support; every other family is refused in one line naming it."""
    cls = methods.get(name)
    unknown = [f for f in cls.families if f not in FAMILIES]
    assert not unknown, f"{name}: Method.families names unknown families {unknown} (known: {', '.join(FAMILIES)})"
    members = member_families(name)
    if members is not None:
        assert set(members) <= set(cls.families), (
            f"{name}: its members support {', '.join(members)} but Method.families declares only "
            f"{', '.join(cls.families)}: derive a composition's families from its members")
    for family in FAMILIES:
        model, _ = tiny(family)
        m = build(name)
        if family in cls.families and (members is None or family in members):
            m.validate(get_adapter(model))
            continue
        try:
            m.validate(get_adapter(model))
        except MethodError as e:
            assert family in _one_line(e), f"{name}: the refusal of {family} does not name it: {e}"
            continue
        raise AssertionError(f"{name}: validate accepts {family}, which Method.families does not declare")


@functools.lru_cache(maxsize=None)
def registered() -> tuple[str, ...]:
    return tuple(methods.available())
