"""A vision-side method that removes nothing leaves LLaVA-NeXT's anyres packing (unpad + newlines)
untouched, so its analytic FLOPs must be the dense ones (regression: it used the reduced packing)."""
import pytest
from PIL import Image

import methods
from harness.efficiency import flops as F
from harness.models import get_adapter
from harness.models.tiny import build_tiny


@pytest.mark.parametrize("name, params", [("tome", {"r": 0}), ("ficoco_v", {"r": 0, "start_layer": 0})])
def test_noop_on_llava_next_counts_dense(name, params):
    model, processor = build_tiny("llava_next", "llama")
    adapter = get_adapter(model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (64, 96)), text=prompt, return_tensors="pt")
    method = methods.build(name, params)
    method.validate(adapter)
    method.apply(model, adapter)
    counted = F.count_prefill(model, inputs).flops
    (layout,) = F.layouts_from_inputs(model.config, inputs)
    assert F.analytic_prefill(model.config, layout, method=method) == counted
    assert F.analytic_prefill(model.config, layout) == counted
