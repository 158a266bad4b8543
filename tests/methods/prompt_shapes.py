"""Prompts of several shapes for the method tests: 1-3 images per prompt, LLaVA-NeXT images of several
sizes (different crop counts and unpadded grids), and the tiny-model settings at which every method
really reduces (tiny models: 64 visual tokens per crop, 5 CLIP layers, 4 LLM layers)."""
from __future__ import annotations

import functools

import pytest
import torch

import methods
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from tests.efficiency.helpers import image

#: image sizes (height, width) giving LLaVA-NeXT 3 crops with different unpadded grids, and 5 crops
NEXT_SIZES = [(64, 64), (64, 128), (128, 64), (96, 64), (128, 128)]
TOKEN_METHODS = ["random", "fastv", "ficoco_l", "tome", "ficoco_v", "ficoco_vl"]
LAYER_METHODS = ["shortv", "redundancylens"]
ALL_METHODS = ["none"] + TOKEN_METHODS + LAYER_METHODS
#: parameters besides the budget that make each method act on a 4-layer LLM / 5-layer CLIP
PARAMS = {
    "none": {},
    "random": {},
    "fastv": {"K": 1},
    "ficoco_l": {"start_layer": 1},
    "tome": {},
    "ficoco_v": {"start_layer": 0},
    "ficoco_vl": {"vision_params": {"start_layer": 0}, "llm_params": {"start_layer": 1}},
    "shortv": {"layers": [3, 1]},
    "redundancylens": {"hollow_layers": [0, 2], "ffn_layers": [2, 3], "window": 12, "hollow_block": 8,
                       "ffn_keep": 0.25},
}


@functools.lru_cache(maxsize=None)
def processor(family: str):
    return build_tiny(family, "llama", vision_layers=5)[1]


def fresh_model(family: str, lm: str = "llama", **kw):
    """A new (unpatched) tiny model: 5 CLIP layers so ToMe's bipartite merging reaches small budgets."""
    return build_tiny(family, lm, vision_layers=5, **kw)[0]


def method_at(name: str, budget: float | None = None, **extra):
    """`name` with the test parameters and, for token methods, the per-prompt token budget `budget`."""
    m = methods.build(name, dict(PARAMS[name], **extra))
    if budget is not None and m.budget_tokens_param:
        m = methods.build(name, dict(m.params(), **m.budget_token_params(budget)))
    return m


def applied(name: str, family: str, lm: str = "llama", budget: float | None = None, **kw):
    model = fresh_model(family, lm, **kw)
    adapter = get_adapter(model)
    m = method_at(name, budget)
    m.apply(model, adapter)
    return model, m


def prompt_text(proc, n_images: int, text: str = "What is shown?") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def inputs(proc, sizes_per_prompt, texts=None, first: int = 0):
    """Processor inputs of a batch: prompt b has one image per entry of `sizes_per_prompt[b]` (image
    seeds of prompt `first + b`, so a batch-1 call with `first=b` gives prompt b again)."""
    texts = texts or ["What is shown?"] * len(sizes_per_prompt)
    prompts = [prompt_text(proc, len(s), t) for s, t in zip(sizes_per_prompt, texts)]
    imgs = [image(7 * (b + first) + i, size) for b, sizes in enumerate(sizes_per_prompt) for i, size in enumerate(sizes)]
    return proc(images=imgs, text=prompts, return_tensors="pt", padding=len(prompts) > 1)


# ---- the lmms-eval wrapper --------------------------------------------------------------------------------
class Req:
    """An lmms-eval request: `args` as the wrapper reads them."""

    def __init__(self, *args):
        self.args = args


def wrapper(model, proc, batch_size: int):
    """vtbench's lmms-eval model around a (patched) instance."""
    from harness.lmms_model import VTBenchLMM
    from harness.models import get_adapter

    return VTBenchLMM(model=model, processor=proc, adapter=get_adapter(model), batch_size=batch_size, progress=False)


class _Force:
    """Logits processor forcing the continuation tokens (the raw logits are what `output_logits` returns)."""

    def __init__(self, ids):
        self.ids, self.t = ids, 0

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[self.t]] = 0
        self.t += 1
        return out


def assert_loglikelihood_equals_generation(model, proc, images, context="How many circles are there?",
                                           continuation=" two three"):
    """The wrapper's one-forward log-likelihood of `continuation` equals the log-probs of generating it after
    `context` (prefill of the context, then cached decode steps), for a prompt with `images`."""
    from transformers import LogitsProcessorList

    lm = wrapper(model, proc, 1)
    lm.task_dict = {"t": {"test": [{"images": images}]}}
    (ll, _), = lm.loglikelihood([Req(context, continuation, lambda d: d["images"], 0, "t", "test")])
    inputs = lm.encode([context], [images])
    ids = lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=len(ids), min_new_tokens=len(ids),
                             logits_processor=LogitsProcessorList([_Force(ids)]), output_logits=True,
                             return_dict_in_generate=True, pad_token_id=lm.tokenizer.pad_token_id)
    gen = sum(torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ids))
    assert ll == pytest.approx(gen, abs=1e-4)
