"""The helpers of the method tests (one module; imported as `from tests.methods.helpers import ...`).

* tiny models, cached per process (every caller gets a deep copy) and processor inputs of samples 0-3;
* greedy generation and its checks: cached == uncached recomputation, batch == single prompts (the LLM-side
  checks of the in-LLM and layer-wise methods; the vision-side checks of ToMe / FiCoCo-V / FiCoCo-VL);
* prompts of several shapes: 1-3 images per prompt, LLaVA-NeXT images of several sizes (different crop
  counts and unpadded grids), and the tiny-model settings at which every method really reduces (tiny
  models: 64 visual tokens per crop, 5 CLIP layers, 4 LLM layers);
* the lmms-eval wrapper (`Req`, `wrapper`) and its log-likelihood == generation check.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

import methods
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from tests.efficiency.helpers import image

# ---- tiny models and inputs of the LLM-side method tests -------------------------------------------------
QUESTIONS = [
    "What is shown?",
    "How many circles are there in the image?",
    "Which letter?",
    "Is there a red square left of the blue star?",
]
#: LLaVA-NeXT image sizes (width, height) of samples 0-3 (different crop counts -> different lengths)
NEXT_SAMPLE_SIZES = [(64, 64), (128, 64), (64, 128), (96, 80)]
_TINY: dict = {}


def tiny(family="llava", lm="llama", gqa=False, attn="sdpa", num_layers=4, vision_layers=3):
    """A tiny random model (built once per process and settings) as a fresh deep copy, and its processor."""
    key = (family, lm, gqa, attn, num_layers, vision_layers)
    if key not in _TINY:
        _TINY[key] = build_tiny(family, lm, gqa=gqa, attn_implementation=attn, num_layers=num_layers,
                                vision_layers=vision_layers)
    model, proc = _TINY[key]
    return copy.deepcopy(model), proc


def sizes_of(family: str):
    """The image size(s) `make_inputs` uses for a family: LLaVA-NeXT samples differ in size."""
    return NEXT_SAMPLE_SIZES if family == "llava_next" else (64, 64)


def make_inputs(proc, idx=(0,), size=(64, 64)):
    """Processor inputs for samples `idx` (batch > 1: left padded). `size`: (w, h) of every image, or a
    dict / list of per-sample sizes indexed by the sample."""
    imgs, texts = [], []
    for i in idx:
        w, h = size[i] if isinstance(size, (dict, list)) else size
        imgs.append(image(i, (h, w)))
        texts.append(proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}],
            add_generation_prompt=True))
    if len(idx) == 1:
        return proc(images=imgs[0], text=texts[0], return_tensors="pt")
    return proc(images=imgs, text=texts, return_tensors="pt", padding=True)


def forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def generate(model, inputs, steps):
    """`steps` greedy tokens (no EOS stop): sequences, stacked logits [B, steps, V], the cache."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None)
    return out.sequences, torch.stack(out.logits, 1), out.past_key_values


def llm_layout(model, inputs):
    """TokenLayout of a batch-1 prompt with one contiguous visual span (LLM side only)."""
    from harness.efficiency.analytic import TokenLayout

    vis = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    T = inputs["input_ids"].shape[1]
    assert len(vis) and int(vis[-1] - vis[0]) + 1 == len(vis)
    return TokenLayout(before=int(vis[0]), visual=len(vis), after=T - int(vis[-1]) - 1)


def check_uncached(model, inputs, seqs, logits, pin=True):
    """Each greedy step recomputed without cache (full forward over prompt + generated prefix, the
    scoring token of an in-LLM reducer pinned to the prompt's last token) agrees with the cached generation."""
    P = inputs["input_ids"].shape[1]
    if pin and LR.get_reducer(model) is not None:
        LR.pin_prompt_length(model, P)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    try:
        for j in range(logits.shape[1]):
            ids = seqs[:, : P + j]
            mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], j, dtype=torch.long)], 1)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = forward(model, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **extra},
                          use_cache=False).logits[:, -1]
            torch.testing.assert_close(out, logits[:, j], atol=1e-4, rtol=1e-4)
            assert torch.equal(out.argmax(-1), seqs[:, P + j])
    finally:
        if LR.get_reducer(model) is not None:
            LR.pin_prompt_length(model, None)


def check_decode_consistency(model, proc, steps=3, size=(64, 64)):
    """Cached == uncached greedy decoding at batch 4 (left padded) and batch 1, and the batch result per
    sample equals the batch-1 result."""
    idx = (0, 1, 2, 3)
    inp4 = make_inputs(proc, idx, size=size)
    assert int((inp4["attention_mask"] == 0).sum()) > 0  # really padded
    seqs4, logits4, _ = generate(model, inp4, steps)
    check_uncached(model, inp4, seqs4, logits4)
    for b in idx:
        one = make_inputs(proc, (b,), size=size)
        s1, l1, _ = generate(model, one, steps)
        if b == 0:
            check_uncached(model, one, s1, l1)
        torch.testing.assert_close(l1[0], logits4[b], atol=1e-4, rtol=1e-4)
        assert torch.equal(s1[0, -steps:], seqs4[b, -steps:])
    return seqs4, logits4


def greedy_uncached(model, inp, steps):
    """`steps` greedy tokens, each from a full forward without cache (M-RoPE families: the token types
    grow with the text; an in-LLM reducer's scoring pinned to the prompt)."""
    ids, am, mm = inp["input_ids"], inp["attention_mask"], inp.get("mm_token_type_ids")
    extra = {k: v for k, v in inp.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    reducer = LR.get_reducer(model)
    if reducer is not None:
        LR.pin_prompt_length(model, ids.shape[1])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            kw = dict(extra, **({"mm_token_type_ids": mm} if mm is not None else {}))
            logits = model(input_ids=ids, attention_mask=am, use_cache=False, **kw).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            mm = None if mm is None else torch.cat([mm, torch.zeros_like(nxt)], 1)
    if reducer is not None:
        LR.pin_prompt_length(model, None)
    return torch.cat(out, 1)


# ---- prompts of several shapes ---------------------------------------------------------------------------
#: image sizes (height, width) giving LLaVA-NeXT 3 crops with different unpadded grids, and 5 crops
NEXT_SIZES = [(64, 64), (64, 128), (128, 64), (96, 64), (128, 128)]
TOKEN_METHODS = ["random", "fastv", "pdrop", "dart", "ficoco_l", "tome", "ficoco_v", "ficoco_vl"]
LAYER_METHODS = ["shortv", "redundancylens"]
ALL_METHODS = ["none"] + TOKEN_METHODS + LAYER_METHODS
#: parameters besides the budget that make each method act on a 4-layer LLM / 5-layer CLIP
PARAMS = {
    "none": {},
    "random": {},
    "fastv": {"K": 1},
    "pdrop": {"layers": [1, 2, 3]},
    "dart": {"K": 1},
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


# ---- the vision-side checks (ToMe, FiCoCo-V, FiCoCo-VL and tests/methods/test_vision_reduce.py) ------------
VISION_QUESTIONS = ["What colour?", "How many circles are there in the top left?", "Which letter?", "Is it red?"]
#: LLaVA-NeXT image sizes (height, width) of samples 0-3 in the vision-side tests
IMAGE_SIZES = [(64, 64), (64, 128), (128, 64), (64, 64)]


def vision_inputs(processor, idx: list[int], family: str = "llava"):
    """Processor inputs for samples `idx` (different questions -> different lengths -> left padding)."""
    prompts, images = [], []
    for i in idx:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VISION_QUESTIONS[i]}]}]
        prompts.append(processor.apply_chat_template(conv, add_generation_prompt=True))
        images.append(image(i, IMAGE_SIZES[i] if family == "llava_next" else (64, 64)))
    if len(idx) == 1:
        return processor(images=images[0], text=prompts[0], return_tensors="pt")
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _image_kwargs(inputs):
    return {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}


def generate_new(model, inputs, n_new):
    """Up to `n_new` greedy tokens (stopping at EOS): the new tokens [B, n] and their logits [B, n, V]."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=n_new, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    T = inputs["input_ids"].shape[1]
    return out.sequences[:, T:], torch.stack(out.logits, dim=1)  # [B, n], [B, n, V]


def check_recomputed(model, inputs, n_new=4, eos=2, recompute_ctx=None):
    """Greedy generation with KV cache == step-by-step recomputation without cache (same method
    applied). `recompute_ctx(inputs)`, if given, is a context manager entered around the uncached
    forwards (e.g. pinning an LLM-side method's scoring to the prompt). Returns tokens and logits."""
    new, logits = generate_new(model, inputs, n_new)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    for t in range(n_new):
        x = torch.cat([ids, new[:, :t]], dim=1)
        m = torch.cat([am, torch.ones_like(new[:, :t])], dim=1)
        with torch.no_grad(), (recompute_ctx(inputs) if recompute_ctx else contextlib.nullcontext()):
            ref = model(input_ids=x, attention_mask=m, use_cache=False, **_image_kwargs(inputs)).logits[:, -1]
        for b in range(x.shape[0]):
            if (new[b, :t] == eos).any():
                continue  # finished sample: generate pads it
            assert torch.allclose(ref[b], logits[b, t], atol=1e-4, rtol=1e-4), (b, t)
            assert int(ref[b].argmax()) == int(new[b, t]), (b, t)
    return new, logits


def check_batch_equals_single(model, processor, family="llava", n_new=4, eos=2, idx=(0, 1, 2, 3), recompute_ctx=None):
    """Batch of 4 with left padding: each sample's greedy tokens/logits == its batch-1 run."""
    batch = vision_inputs(processor, list(idx), family)
    new_b, logits_b = check_recomputed(model, batch, n_new, eos, recompute_ctx)
    for j, i in enumerate(idx):
        new_1, logits_1 = generate_new(model, vision_inputs(processor, [i], family), n_new)
        stop = n_new
        hits = (new_1[0] == eos).nonzero()
        if len(hits):
            stop = int(hits[0]) + 1
        assert torch.equal(new_b[j, :stop], new_1[0, :stop]), (i, new_b[j], new_1[0])
        assert torch.allclose(logits_b[j, :stop], logits_1[0, :stop], atol=1e-4, rtol=1e-4), i


def check_flops(model, method, inputs):
    """Counted (fvcore, per component) == the method's analytic formula, all four components."""
    from harness.efficiency.flops import analytic_prefill, count_prefill, layouts_from_inputs

    layout = layouts_from_inputs(model, inputs)[0]
    counted = count_prefill(model, inputs)
    analytic = analytic_prefill(model.config, layout, method)
    assert counted.flops == analytic, (counted.flops, analytic)
    return counted


def llm_visual_tokens(model, inputs) -> int:
    """Visual tokens the LLM received in one prefill (from the visual-token context)."""
    with torch.no_grad():
        model(**inputs)
    ctx = get_context(model)
    per_layer = ctx.visual_tokens_per_layer
    assert per_layer is not None and len(set(per_layer)) == 1
    return per_layer[0]


def check_meta_flops(name: str, params: dict, model: str = "llava15_7b"):
    """Full-size architecture on the meta device (no weights): counted prefill == analytic."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import methods
    from harness.efficiency import flops as F
    from harness.models.loading import config_from_cfg, meta_model

    root = Path(__file__).resolve().parents[2]
    config = config_from_cfg(OmegaConf.load(root / f"conf/model/{model}.yaml"))
    meta = meta_model(config)
    method = methods.build(name, params)
    method.apply(meta, get_adapter(meta))
    layout = F.synthetic_layout(config)
    counted = F.count_prefill(meta, F.synthetic_inputs(config))
    assert counted.flops == F.analytic_prefill(config, layout, method)
