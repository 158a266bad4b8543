"""The ``batch`` part: batched evaluation through the lmms-eval wrapper versus batch 1."""
from __future__ import annotations

import gc

from harness.bench.measure import interleaved, med
from harness.bench.setup import make_image, make_question


class BatchPart:
    """The batch part of `Bench` (a mixin: the shared inputs are `Bench`'s)."""

    # batch -----------------------------------------------------------------------------------------------
    def batch(self, names=("none",)) -> dict:
        from harness.lmms_model import VTBenchLMM
        from harness.models import get_adapter

        spec = self.spec
        _, processor = self.base
        B = spec.batch
        questions = [make_question(spec.text_words // 2 + 3 * i, seed=i) for i in range(B)]
        images = [[make_image(100 + i, self.image_size)] for i in range(B)]
        out = {"batch": B, "new_tokens": spec.batch_new_tokens, "methods": {}}
        for name, _, _, m in self._patched(names):
            lm = VTBenchLMM(model=m, processor=processor, adapter=get_adapter(m), batch_size=B, progress=False)
            lengths = [int(self.encode(processor, [q], [im[0]])["input_ids"].shape[1])
                       for q, im in zip(questions, images)]

            def one_by_one():
                return [lm.generate_batch([q], [im], spec.batch_new_tokens)[0] for q, im in zip(questions, images)]

            def batched():
                return lm.generate_batch(questions, images, spec.batch_new_tokens)

            self.log(f"batch: {name}")
            outs: dict = {}
            rounds = max(1, spec.gen_repeats // 2)
            times = interleaved({"batch 1": one_by_one, f"batch {B}": batched}, rounds,
                                warmup=0, device=spec.device, log=self.log, outputs=outs,
                                stop=self._stop(f"batch: {name}", rounds, 0.5))
            p1, pB = outs["batch 1"], outs[f"batch {B}"]
            t1, tB = med(times["batch 1"]), med(times[f"batch {B}"])
            out["methods"][name] = {
                "prompt_lengths": lengths, "batch1_s": t1, "batchB_s": tB, "throughput_ratio": t1 / tB,
                "same_predictions": p1 == pB, "n_different": sum(a != b for a, b in zip(p1, pB)),
                "times": times,
            }
            del lm, m
            gc.collect()
        return out
