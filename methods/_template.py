"""`mymethod` — <one line: what it removes, where> (<authors>, "<paper title>", <venue / arXiv id>).

TEMPLATE, not registered (the registry skips modules whose name starts with "_"). Copy it to
`methods/<name>.py`, rename the class and `name`, fill in every hook below, add `conf/method/<name>.yaml`,
then run the conformance suite on it alone:

    pytest -p no:cacheprovider -n 0 -q -k "conformance and <name>" tests/methods/

The suite (tests/methods/test_conformance.py, README "Add a method") picks the method up from the registry:
no test list to edit. Each hook says which of its properties needs it; a reducing method without one fails
the suite with a message naming the hook. The smallest complete, registered example is `methods/stride.py`.

Write the paper's equations in short docstrings where they are implemented, and talk to the model through
the `adapter` (harness/models/adapter.py: `llm_layers`, `vision_layers`, `image_token_id`, ...), never to
transformers internals. Shared machinery (methods/_shared/) does the hard parts once:
`llm_reduce` (drop / merge visual tokens between decoder layers), `reduced_layer` (layer-wise methods),
`vision_reduce` (merging inside the CLIP tower, placeholder shrinking), `context` (where the visual tokens are).
"""
from __future__ import annotations

import dataclasses

from harness.efficiency import analytic as A
from methods import register  # noqa: F401  (decorate the class with @register in your copy)
from methods._shared import llm_reduce as LR
from methods.base import LLM_SIDE_FAMILIES, Method, MethodError


class _Plan(LR.ReductionPlan):
    """What happens inside the LLM (an LLM-side method): `before_layer(view)` returns the indices of the
    tokens kept from that layer on (every non-visual token + the chosen visual ones), or None."""

    def __init__(self, keep: int):
        self.keep = keep

    def before_layer(self, view):
        if view.layer != 0:
            return None
        visual = view.visual                                  # [B, n] bool
        nv = LR.equal_visual_count(visual, "mymethod")
        if self.keep >= nv:
            return None
        # <- the paper's score of each visual token (here: earlier tokens first). Scores must not depend
        #    on padding or batch neighbours (suite "batch": a padded batch == each prompt alone)
        scores = -visual.long().cumsum(1).float()
        return LR.keep_top_visual(scores, visual, self.keep)


# @register            <- uncomment in your copy
@dataclasses.dataclass
class MyMethod(Method):
    name = "mymethod"                                         # registry name = conf/method/<name>.yaml
    #: families it acts on (suite: refusals of the others are one line naming the family; a composition
    #: derives them from its members). Vision-side CLIP methods: methods.base.LLAVA_FAMILIES
    families = LLM_SIDE_FAMILIES
    #: suite "noop": parameters of the documented no-op (logits identical to the unpatched model), or None
    noop = {"keep": None}
    #: suite "cache / batch / FLOPs / tokens / budget": parameters that really reduce on the tiny models
    #: (64 visual tokens per image or crop, 4 LLM layers, 5 CLIP layers)
    example = {"keep": 16}
    #: suite "meta": False if the patched model reads tensor values (input_ids positions, .item(), scores)
    meta_countable = False
    #: suite "budget": the parameter budget.kind=tokens sets (a count > 1 or a share <= 1 of the prompt's
    #: visual tokens; override `budget_token_params` if yours means something else) and the one a FLOPs
    #: budget is solved over (`budget_candidates` / `budget_params` if not a visual-token count)
    budget_tokens_param = "keep"
    budget_param = "keep"

    #: visual tokens kept per prompt (None: all of them, the no-op). Annotate every field with its type:
    #: suite "bad parameters" checks NaN / wrong types are refused against it in one line
    keep: int | None = None

    def check_params(self) -> None:
        """Model-independent range checks (suite "bad parameters"): raise MethodError, one line naming
        the parameter (`methods.build` puts `method.params.<key>=<value>:` in front)."""
        if self.keep is not None and self.keep < 1:
            raise MethodError(f"mymethod: keep must be an integer >= 1, got {self.keep!r}")

    def validate(self, adapter) -> None:
        """Checks against the model, before any weights load (runs on a meta copy): the family check of
        Method.validate, then layer counts, token counts, attention kind; raise MethodError (one line)."""
        super().validate(adapter)
        if self.keep is not None:
            self.require_full_attention(adapter)

    def apply(self, model, adapter):
        """Patch this model instance (suite "noop", "cache", "batch"): leave it untouched at the no-op."""
        self.validate(adapter)
        if self.keep is not None:
            LR.install(model, adapter, _Plan(self.keep))
        return model

    def visual_tokens_kept(self, layout) -> int:
        """Suite "tokens": visual tokens reaching the LLM's last layer for one prompt `layout` (a
        TokenLayout: `visual` = the prompt's visual tokens, all images and crops). Records, budgets and
        `vtbench-flops` report it; the probe marks a record where the model disagrees."""
        return layout.visual if self.keep is None else min(self.keep, layout.visual)

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        """Suite "FLOPs": MACs of one prefill per component (vision, projector, llm, lm_head) from
        harness.efficiency.analytic primitives; fvcore's count of the patched model must equal it (x2).
        In-LLM droppers also give `llm_visual_schedule`, layer-wise methods `llm_layer_macs_at`, so that
        compositions (methods/compose.py) can combine them."""
        macs = A.dense_prefill_macs(shapes, layout)
        macs["llm"] = A.llm_prefill_macs(shapes.llm, layout.with_visual(self.visual_tokens_kept(layout)).total)
        return macs
