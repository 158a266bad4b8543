"""Set-up of the bench: what it runs (methods, compositions, the common budget, targets), the random
models (`build_model`, `build_full`) and their inputs, the methods at the common budget."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

PARTS = ("overhead", "methods", "scores", "batch", "flops", "sweep")
METHODS = ("none", "random", "fastv", "tome", "ficoco_v", "ficoco_l", "ficoco_vl", "shortv", "redundancylens")
#: the named compositions (conf/method/<name>.yaml, methods/compose.py); the methods part runs them on request
#: (`--methods`) and the GPU run (`--gpu-full`) always
COMPOSITIONS = ("shortv_fastv", "redundancylens_fastv")
ALL_METHODS = METHODS + COMPOSITIONS
#: measured / predicted prefill speed-up targets (issue 9.2)
TARGETS = {"fastv": 0.85, "tome": 0.85, "ficoco_v": 0.85, "ficoco_l": 0.85, "ficoco_vl": 0.85,
           "shortv": 0.8, "redundancylens": 0.8}
#: the common budget: visual tokens reaching the LLM, as a fraction of the image's (0.3333 x 576 = 192)
BUDGET_TOKENS = 1 / 3
OVERHEAD_TARGET = 0.03


# ---- set-up ----------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """What the bench runs on; `quick` is the smoke-test scale."""

    quick: bool = False
    repeats: int = 5
    gen_repeats: int = 3
    gen_tokens: int = 16
    text_words: int = 30
    batch: int = 8
    batch_new_tokens: int = 8
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    model: dict = field(default_factory=dict)
    #: FLOP counter of the methods part (None: `count_prefill`'s default, fvcore on a real model)
    counter: str | None = None
    #: record each method's peak memory growth in its first timed prefill / generate (the GPU run)
    memory: bool = False

    @classmethod
    def make(cls, quick: bool, repeats: int | None, threads: int | None, device: str) -> "Spec":
        if quick:
            model = dict(image_size=112, patch_size=14, vision_hidden=32, vision_layers=4, hidden_size=64,
                         intermediate_size=128, num_layers=6, num_heads=4)
            s = cls(quick=True, repeats=repeats or 1, gen_repeats=repeats or 1, gen_tokens=4, text_words=8,
                    batch=4, batch_new_tokens=3, model=model)
        else:
            model = dict(image_size=336, patch_size=14, vision_hidden=256, vision_layers=8, hidden_size=1024,
                         intermediate_size=2816, num_layers=16, num_heads=16)
            # more prefill repetitions steady the medians on a noisy machine; generate / scores / batch stay
            # at 3 / 3 / 1 rounds (they take 2-10x longer per call)
            s = cls(repeats=repeats or 5, gen_repeats=min(3, max(1, (repeats or 5) * 3 // 5)), model=model)
        s.threads = threads or (torch.get_num_threads() if device.startswith("cuda") else 2)
        s.device = device
        if device.startswith("cuda") and not quick:
            s.dtype = "float16"
        return s


def build_model(spec: Spec):
    """The random model of the bench (seeded): LLaVA-1.5-shaped tiny/mid-size, or with `--arch llava15_7b`
    the full architecture (see `build_full`)."""
    from harness.models.tiny import build_tiny

    model, processor = build_tiny("llava", "llama", seed=0, **spec.model)
    dtype = getattr(torch, spec.dtype)
    return model.to(spec.device, dtype).eval(), processor


#: model families `build_full` builds (conf/model/<name>.yaml with `family:` one of these)
FULL_FAMILIES = ("llava", "llava_next")


def full_config(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """The transformers config of conf/model/<name>.yaml (its `arch` block), with optional Hydra overrides
    (e.g. ``model.arch.text_config.num_hidden_layers=2``: the tests build scaled-down copies this way).
    Refuses a family `build_full` cannot build (one-line ValueError)."""
    from harness.config import compose_config
    from harness.models.adapter import family_of
    from harness.models.loading import config_from_cfg

    cfg = compose_config([f"model={name}", *overrides])
    config = config_from_cfg(cfg.model)
    family = family_of(config)
    if family not in FULL_FAMILIES:
        raise ValueError(f"model={name}: family {family!r} has no full-size bench build "
                         f"(supported: {', '.join(FULL_FAMILIES)})")
    return config


def build_full(name: str, spec: Spec, overrides: list[str] | tuple[str, ...] = ()):
    """Full-size architecture from conf/model/<name>.yaml (LLaVA-1.5 or LLaVA-NeXT, dispatched on the
    config's model type by `AutoModelForImageTextToText`) with random weights created on `spec.device`
    (seeded; ``meta`` builds it without memory), plus the tiny tokenizer and a processor re-targeted at
    the config's image size, patch size and (NeXT) grid pinpoints. `overrides`: see `full_config`."""
    from transformers import AutoModelForImageTextToText

    from harness.models.tiny import make_tokenizer

    config = full_config(name, overrides)
    tok = make_tokenizer()
    config.image_token_id = config.image_token_index = tok.convert_tokens_to_ids("<image>")
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(tok))
    torch.manual_seed(0)
    with torch.device(spec.device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, spec.dtype))
    model.set_attn_implementation("sdpa")
    if spec.device != "meta":
        with torch.no_grad():  # keep activations finite in fp16 with random weights
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
    return model.eval(), full_processor(model.config, tok)


def full_processor(config, tok):
    """A processor for `config` (LLaVA-1.5: CLIP crop at the tower's image size; LLaVA-NeXT: the anyres
    image processor on the config's `image_grid_pinpoints`) with `tok` (its `<image>` is the image token)."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from harness.models.adapter import family_of
    from harness.models.tiny import CHAT_TEMPLATE

    vc = config.vision_config
    s = int(vc.image_size)
    common = dict(tokenizer=tok, patch_size=vc.patch_size, num_additional_image_tokens=1,
                  vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE)
    if family_of(config) == "llava_next":
        pins = [[int(h), int(w)] for h, w in config.image_grid_pinpoints]
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                        image_grid_pinpoints=pins)
        return LlavaNextProcessor(image_processor=ip, **common)
    ip = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return LlavaProcessor(image_processor=ip, **common)


def bench_image_size(config) -> int:
    """Side of the square test image: the tower's input size (LLaVA-1.5: one crop), or for an anyres model
    the largest square grid pinpoint (LLaVA-NeXT-7B: 672 px -> the base crop + 2x2 crops, about 2,900
    visual tokens, its largest square case)."""
    pins = getattr(config, "image_grid_pinpoints", None)
    if pins:
        squares = [int(h) for h, w in pins if int(h) == int(w)]
        return max(squares) if squares else int(config.vision_config.image_size)
    return int(config.vision_config.image_size)


def make_image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


_WORDS = "red green blue yellow purple orange white black circle square triangle star left right top bottom".split()


def make_question(n_words: int, seed: int = 0) -> str:
    """A question padded with vocabulary words to about `n_words` words (the tokenizer is tiny)."""
    words = [_WORDS[(seed * 7 + i * 3) % len(_WORDS)] for i in range(n_words)]
    return "What is shown in the image? " + " ".join(words) + " Answer with one word."


def share_weights_copy(model):
    """A deep copy of `model` whose parameters and buffers are the original tensors (methods patch module
    instances, never weights, so every method gets its own modules over one set of weights)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a `DynamicCache` (every layer, as a prefill left them)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def shortv_layers(num_layers: int) -> list[int]:
    """ShortV's LLaVA-1.5-7B layer list (conf/model_method/llava15_7b_shortv.yaml, 32 layers) mapped to
    `num_layers` layers (i -> floor(i * L / 32), duplicates dropped, order kept), first round(19/32 * L)."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR

    paper = list(OmegaConf.load(CONF_DIR / "model_method" / "llava15_7b_shortv.yaml").params.layers)
    mapped: list[int] = []
    for i in paper:
        j = i * num_layers // 32
        if j not in mapped:
            mapped.append(j)
    return mapped[: int(round(len(paper) / 32 * num_layers))]


def method_settings(adapter, names=METHODS) -> list[tuple[str, Any, dict]]:
    """(name, built Method, budget info) for every method at the common budget; ShortV/RedundancyLens have
    no token budget and get explicit layer lists (see the report)."""
    import methods as registry
    from harness.budget import resolve

    L = adapter.num_llm_layers
    n_vis = adapter.visual_tokens_per_image
    vision_start = max(1, adapter.num_vision_layers // 2)
    params = {
        "none": {},
        "random": {},
        "fastv": {},
        "tome": {},
        "ficoco_v": {"start_layer": vision_start},
        "ficoco_l": {"start_layer": min(4, L - 2)},
        "ficoco_vl": {"vision_params": {"start_layer": vision_start}, "llm_params": {"start_layer": min(4, L - 2)}},
        "shortv": {"layers": shortv_layers(L)},
        "redundancylens": {"hollow_layers": list(range(L // 2, L)), "ffn_layers": list(range(L // 2, L)),
                           "window": max(1, round(256 / 576 * n_vis))},
    }
    # the compositions: the same layer-wise settings, then FastV (K=2) whose keep the common budget sets;
    # FastV's scoring layer K-1 = 1 may not be reduced by the layer-wise member (refused otherwise)
    params["shortv_fastv"] = {"members": [
        {"name": "shortv", "params": {"layers": [i for i in params["shortv"]["layers"] if i != 1]}},
        {"name": "fastv", "params": {"K": 2}}]}
    params["redundancylens_fastv"] = {"members": [
        {"name": "redundancylens", "params": {k: ([i for i in v if i != 1] if isinstance(v, list) else v)
                                              for k, v in params["redundancylens"].items()}},
        {"name": "fastv", "params": {"K": 2}}]}
    out = []
    for name in names:
        m = registry.build("compose" if name in COMPOSITIONS else name, params[name])
        m.validate(adapter)
        info: dict = {}
        if name != "none" and m.budget_tokens_param:
            m, info = resolve(m, adapter, {"kind": "tokens", "value": BUDGET_TOKENS})
        out.append((name, m, info))
    return out
