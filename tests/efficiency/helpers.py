"""Helpers of the efficiency tests: tiny models (cached) and processor inputs."""
from __future__ import annotations

import functools

import numpy as np


def image(seed: int = 0, size=(64, 64)):
    from PIL import Image

    h, w = size
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def prompt(processor, text: str = "What is shown?") -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True,
    )


@functools.lru_cache(maxsize=None)
def tiny(family: str = "llava", lm: str = "llama", gqa: bool = False, attn: str = "sdpa"):
    from harness.models.tiny import build_tiny

    return build_tiny(family, lm, gqa=gqa, attn_implementation=attn)


def inputs_for(processor, texts=("What is shown?",), sizes=None):
    sizes = sizes or [(64, 64)] * len(texts)
    imgs = [image(i, s) for i, s in enumerate(sizes)]
    prompts = [prompt(processor, t) for t in texts]
    if len(texts) == 1:
        return processor(images=imgs[0], text=prompts[0], return_tensors="pt")
    return processor(images=imgs, text=prompts, return_tensors="pt", padding=True)
