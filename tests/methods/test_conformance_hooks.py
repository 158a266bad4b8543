"""The conformance suite fails a method that lacks a hook, naming the hook, and passes it once the hook is
there: a throw-away method (every k-th visual token, like `stride`) is registered from a temporary module,
without and then with its FLOPs / token / budget hooks, and the suite's own check functions run on it."""
from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

import methods
from tests.methods import conformance as C

SOURCE = textwrap.dedent('''
    import dataclasses

    from harness.efficiency import analytic as A
    from methods import register
    from methods._shared import llm_reduce as LR
    from methods.base import LLM_SIDE_FAMILIES, Method
    from methods.stride import _StridePlan, kept_ordinals


    @register
    @dataclasses.dataclass
    class NoHooks(Method):
        """Drops visual tokens at the LLM input but declares none of the FLOPs, token or budget hooks."""
        name = "throwaway_nohooks"
        families = LLM_SIDE_FAMILIES
        noop = {"k": 1}
        example = {"k": 3}
        meta_countable = False
        k: int = 2

        def apply(self, model, adapter):
            self.validate(adapter)
            if self.k > 1:
                LR.install(model, adapter, _StridePlan(self.k, None))
            return model


    @register
    @dataclasses.dataclass
    class WithHooks(NoHooks):
        """The same method with the hooks the suite asks for."""
        name = "throwaway_hooks"
        budget_tokens_param = "keep"
        budget_param = "keep"
        keep: float | None = None

        def apply(self, model, adapter):
            self.validate(adapter)
            if self.k > 1 or self.keep is not None:
                LR.install(model, adapter, _StridePlan(self.k, self.keep))
            return model

        def visual_tokens_kept(self, layout):
            return len(kept_ordinals(layout.visual, self.k, self.keep))

        def analytic_prefill_macs(self, shapes, layout):
            macs = A.dense_prefill_macs(shapes, layout)
            macs["llm"] = A.llm_prefill_macs(shapes.llm, layout.with_visual(self.visual_tokens_kept(layout)).total)
            return macs
''')


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory):
    """Register the two throw-away methods from a temporary module; unregister them afterwards."""
    path = tmp_path_factory.mktemp("throwaway") / "throwaway_method.py"
    path.write_text(SOURCE)
    methods.available()  # the registry's own modules first
    spec = importlib.util.spec_from_file_location("throwaway_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["throwaway_method"] = module
    spec.loader.exec_module(module)
    try:
        yield
    finally:
        for name in ("throwaway_nohooks", "throwaway_hooks"):
            methods._REGISTRY.pop(name, None)
        sys.modules.pop("throwaway_method", None)
        C._APPLIED.clear()


@pytest.mark.parametrize("check, hook", [
    (C.check_flops, "Method.analytic_prefill_macs"),
    (C.check_kept, "Method.visual_tokens_kept"),
    (C.check_budget, "Method.budget_tokens_param"),
], ids=["flops", "kept", "budget"])
def test_conformance_fails_naming_the_missing_hook(throwaway, check, hook):
    with pytest.raises(AssertionError) as e:
        check("throwaway_nohooks", "llava")
    assert hook in str(e.value)


FAMILY_CHECKS = [C.check_noop, C.check_cache, C.check_batch, C.check_flops, C.check_kept, C.check_budget,
                 C.check_meta]


@pytest.mark.parametrize("check", FAMILY_CHECKS + [C.check_bad_params, C.check_families],
                         ids=lambda f: f.__name__)
def test_conformance_passes_with_the_hooks(throwaway, check):
    if check in FAMILY_CHECKS:
        check("throwaway_hooks", "llava")
    else:
        check("throwaway_hooks")


def test_conformance_template_passes_when_registered():
    """methods/_template.py, registered as it stands, passes the suite's checks (so the template a new
    author copies cannot rot)."""
    from methods import _template as T

    methods.available()
    methods.register(T.MyMethod)
    try:
        for check in (C.check_noop, C.check_cache, C.check_batch, C.check_flops, C.check_kept, C.check_budget):
            check("mymethod", "llava")
        C.check_bad_params("mymethod")
    finally:
        methods._REGISTRY.pop("mymethod", None)
        C._APPLIED.clear()
