"""Prompts of several shapes for the method tests: 1-3 images per prompt, LLaVA-NeXT images of several
sizes (different crop counts and unpadded grids), and the tiny-model settings at which every method
really reduces (tiny models: 64 visual tokens per crop, 5 CLIP layers, 4 LLM layers)."""
from __future__ import annotations

import functools

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
