"""The ``overhead`` part: method ``none`` through the harness path versus Hugging Face directly."""
from __future__ import annotations

import gc

import torch

from harness.bench.measure import interleaved, med, paired_ratios, spread
from harness.bench.setup import OVERHEAD_TARGET, make_image, make_question


class OverheadPart:
    """The overhead part of `Bench` (a mixin: the shared inputs are `Bench`'s)."""

    # overhead --------------------------------------------------------------------------------------------
    def overhead(self) -> dict:
        """Harness path (`load_model` + method none + VTBenchLMM.generate_batch) vs HF directly."""
        import tempfile

        from transformers import AutoModelForImageTextToText, AutoProcessor

        import methods
        from harness.config import compose_config
        from harness.lmms_model import VTBenchLMM
        from harness.models.loading import load_model

        spec = self.spec
        model, processor = self.base
        with tempfile.TemporaryDirectory(prefix="vtbench-bench-") as d:
            model.save_pretrained(d)
            processor.save_pretrained(d)
            cfg = compose_config([f"model.pretrained={d}", f"run.device={spec.device}", f"model.dtype={spec.dtype}"])
            h_model, h_proc, adapter = load_model(cfg.model, spec.device, spec.dtype)
            methods.build("none").apply(h_model, adapter)
            lm = VTBenchLMM(model=h_model, processor=h_proc, adapter=adapter, batch_size=1,
                            chat_template=cfg.model.get("chat_template"), progress=False)
            d_model = AutoModelForImageTextToText.from_pretrained(
                d, dtype=getattr(torch, spec.dtype), attn_implementation="sdpa").to(spec.device).eval()
            d_proc = AutoProcessor.from_pretrained(d)
        question = make_question(spec.text_words)
        image = make_image(0, self.image_size)
        dtype = getattr(torch, spec.dtype)

        def direct_inputs():
            prompt = self.messages_prompt(d_proc, question)
            x = d_proc(images=[image], text=[prompt], return_tensors="pt")
            return {k: (v.to(spec.device, dtype) if torch.is_floating_point(v) else v.to(spec.device))
                    for k, v in x.items()}

        @torch.inference_mode()
        def direct_prefill():
            return d_model(**direct_inputs(), use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)

        @torch.inference_mode()
        def direct_generate(n=spec.gen_tokens):
            x = direct_inputs()
            out = d_model.generate(**x, **self.gen_kwargs(d_proc, n))
            return d_proc.tokenizer.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)

        def harness_prefill():
            return lm.generate_batch([question], [[image]], 1)

        def harness_generate():
            return lm.generate_batch([question], [[image]], spec.gen_tokens)

        # same answers through both paths (greedy; the harness does not force a minimum length)
        same_first = harness_prefill()[0] == d_proc.tokenizer.decode(direct_prefill(), skip_special_tokens=True)
        self.log("overhead: prefill")
        pre = interleaved({"direct": direct_prefill, "harness": harness_prefill}, spec.repeats, device=spec.device,
                          log=self.log)
        self.log("overhead: generate")
        gen = interleaved({"direct": direct_generate, "harness": harness_generate}, spec.gen_repeats,
                          device=spec.device, log=self.log)
        n_tokens = int(direct_inputs()["input_ids"].shape[1])
        # the harness stops at EOS like any greedy generate: count its forwards (1 prefill + n-1 decode steps)
        calls = []
        hook = h_model.register_forward_hook(lambda *_: calls.append(1))
        harness_generate()
        hook.remove()
        h_new = len(calls)

        def row(times):
            d, h = med(times["direct"]), med(times["harness"])
            # paired: harness / direct within each round (the two run back to back), then the median over
            # rounds; a slow stretch of a shared machine hits both sides of a pair, not one median
            paired = med(paired_ratios(times["harness"], times["direct"]))
            return {"direct_s": d, "harness_s": h, "ratio_of_medians": h / d, "ratio": paired,
                    "overhead": paired - 1.0, "spread_direct": spread(times["direct"]),
                    "spread_harness": spread(times["harness"]), "times": times}

        out = {"prompt_tokens": n_tokens, "prefill": row(pre), "generate": row(gen), "same_first_token": same_first,
               "harness_generated_tokens": h_new, "gen_tokens": spec.gen_tokens,
               "target": OVERHEAD_TARGET}
        out["prefill_overhead_ok"] = out["prefill"]["overhead"] < OVERHEAD_TARGET
        del lm, h_model, d_model
        gc.collect()
        return out
