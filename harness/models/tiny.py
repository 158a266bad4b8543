"""Tiny random LLaVA-family models built from configs (no downloads), for tests and benchmarks.

`build_tiny(family=..., lm=...)` returns `(model, processor)`: a real
`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` with a CLIP vision tower and a
Llama-, Mistral- or Qwen2-style language model (optionally with grouped-query attention), plus a
processor with an in-process trained BPE tokenizer and a PIL image processor.
"""
from __future__ import annotations

import functools

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_BASE_CORPUS = [
    "USER: ASSISTANT: What is shown in the image? Answer with one word.",
    "What colour is the shape in the top left? red green blue yellow purple orange white black gray",
    "How many circles squares triangles stars are there? zero one two three four five six seven eight nine",
    "Which letter is written in the square? A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "Is there a circle left of the triangle? yes no. top bottom left right middle centre row column",
    "The quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 , . ? !",
]

LM_STYLES = ("llama", "mistral", "qwen2")


def make_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in-process; `<image>` is a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _BASE_CORPUS), trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


@functools.lru_cache(maxsize=1)
def _default_tokenizer():
    return make_tokenizer()


def text_config(
    lm: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
):
    """Config of a Llama-, Mistral- or Qwen2-style decoder."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if lm not in LM_STYLES:
        raise ValueError(f"unknown language-model style {lm!r}; choose from {LM_STYLES}")
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if lm == "llama":
        return LlamaConfig(**common)
    if lm == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return Qwen2Config(**common, use_sliding_window=False)


def vision_config(*, image_size=64, patch_size=8, hidden_size=32, num_layers=3, num_heads=4):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )


def build_tiny(
    family: str = "llava",
    lm: str = "llama",
    *,
    gqa: bool = False,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    tokenizer=None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a tiny random model of `family` ('llava' | 'llava_next') with an `lm`-style decoder.

    Returns `(model, processor)`; the model is in eval mode on CPU. `family='qwen2_vl'` builds a
    Qwen2-VL instead (see `build_tiny_qwen2_vl`; `lm`, `image_size` and the CLIP arguments do not apply).
    """
    if family == "llava_onevision":
        return build_tiny_onevision(
            gqa=gqa, image_size=image_size, patch_size=patch_size, vision_hidden=vision_hidden,
            vision_layers=vision_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_layers=num_layers, num_heads=num_heads, seed=seed, attn_implementation=attn_implementation,
            dtype=dtype,
        )
    if family in QWEN_FAMILIES:
        return build_tiny_qwen2_vl(
            family, gqa=gqa, vision_hidden=vision_hidden, vision_layers=vision_layers, hidden_size=hidden_size,
            intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads, seed=seed,
            attn_implementation=attn_implementation, dtype=dtype,
        )
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tokenizer or _default_tokenizer()
    tcfg = text_config(
        lm,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=(num_heads // 2 if gqa else num_heads),
        vocab_size=len(tok),
    )
    vcfg = vision_config(
        image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden, num_layers=vision_layers
    )
    image_token_id = tok.convert_tokens_to_ids("<image>")
    n_img = (image_size // patch_size) ** 2
    torch.manual_seed(seed)
    if family == "llava":
        cfg = LlavaConfig(
            vision_config=vcfg,
            text_config=tcfg,
            image_token_index=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=n_img,
        )
        model = LlavaForConditionalGeneration(cfg)
        ip = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        processor = LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
    elif family == "llava_next":
        s = image_size
        pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        cfg = LlavaNextConfig(
            vision_config=vcfg,
            text_config=tcfg,
            image_token_index=image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_grid_pinpoints=pinpoints,
            image_seq_length=n_img,
        )
        model = LlavaNextForConditionalGeneration(cfg)
        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=pinpoints
        )
        processor = LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
        )
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    model.set_attn_implementation(attn_implementation)
    model = model.to(dtype).eval()
    return model, processor


# ---- Qwen2-VL --------------------------------------------------------------------------------------
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
TINY_FAMILIES = ("llava", "llava_next", "llava_onevision") + QWEN_FAMILIES
QWEN_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: pixel limits of the tiny Qwen2-VL processor: 28x28-pixel merged tokens, between 4 and 36 of them per
#: image (64x64 -> 2x2 merged tokens = 4; 84x56 -> 3x2 = 6, a count that is not a square)
QWEN_TINY_PIXELS = {"shortest_edge": 4 * 28 * 28, "longest_edge": 36 * 28 * 28}


@functools.lru_cache(maxsize=1)
def _qwen_tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS + ["<|im_start|>", "<|im_end|>"]})
    tok.image_token = "<|image_pad|>"
    tok.video_token = "<|video_pad|>"
    return tok


def build_tiny_qwen2_vl(
    family: str = "qwen2_vl",
    *,
    gqa: bool = True,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A tiny random Qwen2-VL (`Qwen2VLForConditionalGeneration`): a packed dynamic-resolution ViT
    (patch 14, temporal patch 2, 2x2 merger) and a Qwen2 decoder with biased q/k/v, M-RoPE
    (`mrope_section` scaled to the tiny head size) and, with `gqa`, grouped-query attention."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from harness.models.loading import image_only_processor

    if family not in QWEN_FAMILIES:
        raise ValueError(f"unknown tiny Qwen family {family!r}; choose from {', '.join(QWEN_FAMILIES)}")
    tok = _qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    half = head_dim // 2  # mrope sections split the head_dim // 2 rotary frequencies (7B: 16+24+24 = 64)
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=(num_heads // 2 if gqa else num_heads), max_position_embeddings=4096,
        rms_norm_eps=1e-6, use_sliding_window=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    )
    if family == "qwen2_5_vl":
        # windows of 2x2 merged tokens (56 px), the last block attends over the whole image; gated MLP
        vision = dict(
            depth=vision_layers, hidden_size=vision_hidden, intermediate_size=vision_hidden * 3 // 2, num_heads=4,
            out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            window_size=56, fullatt_block_indexes=[vision_layers - 1], hidden_act="silu",
        )
        config_cls, model_cls, proc_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    else:
        vision = dict(
            depth=vision_layers, embed_dim=vision_hidden, hidden_size=hidden_size, num_heads=4, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        )
        config_cls, model_cls, proc_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    cfg = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    cfg.vtbench_reference_image = [56, 56]  # 2x2 merged tokens (the processor resizes 64x64 to 56x56)
    model = model_cls(cfg)
    ip = Qwen2VLImageProcessorPil(size=dict(QWEN_TINY_PIXELS), patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = image_only_processor(proc_cls)(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    model.set_attn_implementation(attn_implementation)
    model = model.to(dtype).eval()
    return model, processor


def build_tiny_onevision(
    *, gqa: bool = True, image_size: int = 64, patch_size: int = 8, vision_hidden: int = 32, vision_layers: int = 3,
    hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 4, num_heads: int = 4, seed: int = 0,
    attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
):
    """A tiny random LLaVA-OneVision: SigLIP tower (no CLS, no head, last layer to the projector), anyres
    pinpoints up to 3x3 crops of `image_size`, "anyres_max_1" (so a 3x3 grid is downsampled, as the 7B's
    6x6 grids are with anyres_max_9), a Qwen2 decoder with GQA."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from harness.models.loading import image_only_processor

    tok = _default_tokenizer()
    s = image_size
    pinpoints = [[s * i, s * j] for i in (1, 2, 3) for j in (1, 2, 3)]
    vision = dict(model_type="siglip_vision_model", hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                  num_hidden_layers=vision_layers, num_attention_heads=4, image_size=s, patch_size=patch_size,
                  vision_use_head=False)
    text = text_config("qwen2", hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                       num_heads=num_heads, num_kv_heads=(num_heads // 2 if gqa else num_heads), vocab_size=len(tok))
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<unk>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_1",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    ip = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints)
    processor = image_only_processor(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE, num_image_tokens=(s // patch_size) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1", image_token="<image>",
        video_token="<unk>",
    )
    model.set_attn_implementation(attn_implementation)
    model = model.to(dtype).eval()
    return model, processor


def save_tiny(family: str, out, **kw) -> str:
    """Build a tiny random model of `family` and save it as a checkpoint folder (safetensors, config,
    tokenizer, image processor, chat template) that `model.pretrained` can point at (end-to-end runs of a
    family through the same runner as LLaVA). Returns the folder."""
    import json
    from pathlib import Path

    model, processor = build_tiny(family, **kw)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    settings = {k: getattr(processor, k) for k in ("num_image_tokens", "vision_feature_select_strategy",
                                                   "vision_aspect_ratio", "image_token", "video_token")
                if isinstance(getattr(processor, k, None), (int, str))}
    (out / "processor_config.json").write_text(json.dumps(settings))
    return str(out)


def main(argv=None) -> None:
    """`python -m harness.models.tiny FAMILY OUT`: save a tiny random checkpoint of FAMILY to OUT."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("family", choices=TINY_FAMILIES)
    ap.add_argument("out")
    args = ap.parse_args(argv)
    print(save_tiny(args.family, args.out))


if __name__ == "__main__":
    main()
