"""Tiny random models of each family from configs (no downloads), and the adapter's view of them."""
import pytest
import torch
from PIL import Image

from harness.models import get_adapter
from harness.models.adapter import NotApplicable
from harness.models.tiny import build_tiny


def _inputs(processor, size=(64, 64), n=1):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    imgs = [Image.new("RGB", size, (200, 30, 30 + 40 * i)) for i in range(n)]
    return processor(images=imgs, text=[prompt] * n, return_tensors="pt", padding=n > 1)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("lm, gqa", [("llama", False), ("mistral", True), ("qwen2", True)])
def test_builder_forward_generate(family, lm, gqa):
    model, processor = build_tiny(family, lm, gqa=gqa)
    adapter = get_adapter(model)
    assert adapter.family == family
    assert adapter.text_config.model_type == lm
    kv = adapter.text_config.num_key_value_heads
    assert (kv < adapter.text_config.num_attention_heads) == gqa
    inputs = _inputs(processor, size=(64, 96))
    mask = adapter.visual_mask(inputs["input_ids"])
    if family == "llava":
        assert int(mask.sum()) == adapter.visual_tokens_per_image == 64
    else:  # anyres: base crop + high-res crops + newline tokens
        assert int(mask.sum()) > adapter.visual_tokens_per_image
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3


def test_adapter_geometry_matches_llava_conventions():
    model, _ = build_tiny("llava", "llama")
    a = get_adapter(model)
    assert a.vision_feature_layer == -2
    assert a.last_useful_vision_layer == a.num_vision_layers - 2
    assert len(a.llm_layers) == a.num_llm_layers == 4
    assert a.drops_cls and a.vision_tokens_per_image == a.visual_tokens_per_image + 1


def test_batch_left_padding_locates_visual_tokens_per_sample():
    model, processor = build_tiny("llava", "llama")
    a = get_adapter(model)
    msgs = lambda q: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]  # noqa: E731
    prompts = [processor.apply_chat_template(msgs(q), add_generation_prompt=True) for q in ["a", "a much longer question here"]]
    inputs = processor(images=[Image.new("RGB", (64, 64))] * 2, text=prompts, return_tensors="pt", padding=True)
    assert processor.tokenizer.padding_side == "left"
    assert inputs["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    assert a.visual_mask(inputs["input_ids"]).sum(1).tolist() == [64, 64]


@pytest.mark.bad_input
def test_unsupported_family_is_not_applicable():
    class Cfg:
        model_type = "internvl"  # no adapter (yet)

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(NotApplicable, match="not supported"):
        get_adapter(M())


def test_saved_tiny_qwen2_vl_loads_through_the_runner_loader(tmp_path):
    """A tiny Qwen2-VL saved as a checkpoint folder loads with `load_model` (safetensors, the image-only
    processor without torchvision, the saved chat template) and gives the builder's logits."""
    from harness.models.loading import load_model
    from harness.models.tiny import build_tiny, save_tiny
    from tests.efficiency.helpers import image

    save_tiny("qwen2_vl", tmp_path / "q")
    model, processor, adapter = load_model({"pretrained": str(tmp_path / "q"), "dtype": "float32"})
    ref, ref_proc = build_tiny("qwen2_vl")
    assert adapter.family == "qwen2_vl" and processor.chat_template == ref_proc.chat_template
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inp = processor(images=[image(0, (84, 56))], text=[text], return_tensors="pt")
    ref_inp = ref_proc(images=[image(0, (84, 56))], text=[text], return_tensors="pt")
    assert torch.equal(inp["input_ids"], ref_inp["input_ids"]) and torch.equal(inp["pixel_values"], ref_inp["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, ref(**ref_inp).logits)
