"""The ``methods`` part: every method at the common budget, measured against predicted speed-up."""
from __future__ import annotations

import gc
import time
from typing import Any

import torch

from harness.bench.measure import (component_times, interleaved, med, method_work_times, paired_ratios,
    profile_prefill, quartiles, spread)
from harness.bench.setup import (METHODS, TARGETS, kv_cache_bytes, make_image, make_question, method_settings,
    share_weights_copy)


class MethodsPart:
    """The methods part of `Bench` (a mixin: the shared inputs are `Bench`'s)."""

    # methods ---------------------------------------------------------------------------------------------
    def _patched(self, names=METHODS) -> list[tuple[str, Any, dict, Any]]:
        from harness.models import get_adapter

        base, _ = self.base
        out = []
        for name, method, info in method_settings(get_adapter(base), names):
            m = share_weights_copy(base)
            method.apply(m, get_adapter(m))
            out.append((name, method, info, m))
        return out

    def _trial(self, patched, inputs, processor) -> tuple[list, dict[str, str]]:
        """One 2-token generation per patched model (prefill + a decode step); the ones that raise are
        dropped and returned with their error line. `none` failing is not survivable: it raises."""
        kept, failed = [], {}
        for item in patched:
            try:
                with torch.inference_mode():
                    item[3].generate(**inputs, **self.gen_kwargs(processor, 2))
                kept.append(item)
            except Exception as e:  # noqa: BLE001 - reported in the methods part
                if item[0] == "none":
                    raise
                failed[item[0]] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                self.log(f"{item[0]}: failed its trial generation, dropped: {failed[item[0]]}")
        gc.collect()
        if str(self.spec.device).startswith("cuda"):
            torch.cuda.empty_cache()
        return kept, failed

    def methods(self, names=METHODS) -> dict:
        from transformers import DynamicCache

        from harness.efficiency import flops as F

        spec = self.spec
        _, processor = self.base
        inputs = self.encode(processor, [make_question(spec.text_words)], [make_image(0, self.image_size)])
        config = self.base[0].config
        (layout,) = F.layouts_from_inputs(config, inputs)
        patched = self._patched(names)
        gk = self.gen_kwargs(processor, spec.gen_tokens)
        failed: dict[str, str] = {}
        if self.tolerate_failures:
            patched, failed = self._trial(patched, inputs, processor)

        def prefill_fn(m):
            @torch.inference_mode()
            def f():
                return m(**inputs, use_cache=True, logits_to_keep=1)
            return f

        def gen_fn(m):
            @torch.inference_mode()
            def f():
                return m.generate(**inputs, **gk)
            return f

        rows = []
        for name, method, info, m in patched:
            t0 = time.perf_counter()
            pre = F.count_prefill(m, inputs, counter=spec.counter)
            ana = F.analytic_prefill(config, layout, None if name == "none" else method)
            # the per-layer KV-cache lengths a real prefill leaves (methods may shrink some layers' cache);
            # decode FLOPs are analytic from them (counted == analytic for decode is tested in tests/efficiency)
            cache = DynamicCache(config=config.text_config)
            with torch.inference_mode():
                m(**inputs, use_cache=True, past_key_values=cache, logits_to_keep=1)
            context, kv_lengths = int(cache.get_seq_length()), F.cache_lengths(cache)
            kv_bytes = kv_cache_bytes(cache)
            del cache
            # generate(n) = 1 prefill + (n - 1) decode steps; step i attends to the cache + i new tokens
            steps = []
            for i in range(spec.gen_tokens - 1):
                kv = [n + i for n in kv_lengths] if kv_lengths else None
                steps.append(sum(F.analytic_decode(config, context + i, kv_lengths=kv).values()))
            rows.append({
                "method": name, "description": method.describe(), "budget": info,
                "prefill_flops": pre.total, "prefill_flops_by_component": pre.flops,
                "prefill_flops_analytic": int(sum(ana.values())),
                "counted_equals_analytic": pre.total == int(sum(ana.values())),
                "decode_flops_first": steps[0] if steps else 0, "decode_context": context,
                "kv_lengths": kv_lengths, "kv_cache_bytes": kv_bytes,
                "generate_flops": pre.total + sum(steps), "unsupported_ops": pre.unsupported_ops,
                "count_seconds": round(time.perf_counter() - t0, 2),
            })
            self.log(f"counted {name}: prefill {pre.total / 1e9:.2f} GFLOPs ({rows[-1]['count_seconds']}s)")
        self.log("methods: prefill")
        # the counting pass and the cache pass above already warmed every model up
        pre_mem: dict | None = {} if spec.memory else None
        gen_mem: dict | None = {} if spec.memory else None
        pre_t = interleaved({n: prefill_fn(m) for n, _, _, m in patched}, spec.repeats, warmup=0,
                            device=spec.device, log=self.log, memory=pre_mem,
                            stop=self._stop("methods: prefill", spec.repeats, 0.3))
        self.log("methods: generate")
        gen_t = interleaved({n: gen_fn(m) for n, _, _, m in patched}, spec.gen_repeats, warmup=0,
                            device=spec.device, log=self.log, memory=gen_mem,
                            stop=self._stop("methods: generate", spec.gen_repeats, 0.6))
        ref = rows[0]
        assert ref["method"] == "none"
        t_none, g_none = med(pre_t["none"]), med(gen_t["none"])
        for r in rows:
            n = r["method"]
            r["prefill_s"], r["generate_s"] = med(pre_t[n]), med(gen_t[n])
            r["prefill_spread"], r["generate_spread"] = spread(pre_t[n]), spread(gen_t[n])
            r["prefill_times"], r["generate_times"] = pre_t[n], gen_t[n]
            # measured speed-up = median over rounds of t(none) / t(method) in the same round (paired, as for
            # the harness overhead): a slow stretch of the shared machine hits both sides of a pair, while a
            # ratio of the two medians carries any drift across the run (kept beside it)
            per_round = paired_ratios(pre_t["none"], pre_t[n])
            r["prefill_measured"] = med(per_round)
            r["prefill_measured_rom"] = t_none / r["prefill_s"]
            r["prefill_measured_q"] = quartiles(per_round)
            r["prefill_predicted"] = ref["prefill_flops"] / r["prefill_flops"]
            r["prefill_ratio"] = r["prefill_measured"] / r["prefill_predicted"]
            r["prefill_ratio_rom"] = r["prefill_measured_rom"] / r["prefill_predicted"]
            r["prefill_ratio_q"] = [q / r["prefill_predicted"] for q in r["prefill_measured_q"]]
            r["generate_measured"] = med(paired_ratios(gen_t["none"], gen_t[n]))
            r["generate_predicted"] = ref["generate_flops"] / r["generate_flops"]
            r["generate_ratio"] = r["generate_measured"] / r["generate_predicted"]
            r["prefill_gflops_per_s"] = r["prefill_flops"] / r["prefill_s"] / 1e9
            r["target"] = TARGETS.get(n)
            r["target_met"] = None if r["target"] is None else bool(r["prefill_ratio"] >= r["target"])
            if spec.memory:  # peak memory growth during the method's first timed call (CUDA: max allocated)
                r["prefill_peak_mem_bytes"], r["generate_peak_mem_bytes"] = pre_mem[n], gen_mem[n]
        misses = [r["method"] for r in rows if r["target_met"] is False]
        profiles = {}
        # a profile costs about a dozen prefills per method (profiler, component hooks, own-work timing)
        if misses and (self.guard is None or self.guard.allows(
                self._what(f"methods: profiles of {', '.join(misses)} (under target)"),
                12 * (len(misses) + 1) * max(med(v) for v in pre_t.values()))):
            models = {n: m for n, _, _, m in patched}
            for n in ["none"] + misses:
                self.log(f"profiling {n}" + (" (missed its target)" if n != "none" else ""))
                profiles[n] = profile_prefill(prefill_fn(models[n]), device=spec.device)
                profiles[n]["components_s"] = component_times(models[n], prefill_fn(models[n]), device=spec.device)
                if n != "none":
                    profiles[n]["own_work"] = method_work_times(models[n], prefill_fn(models[n]), device=spec.device)
        del patched
        gc.collect()
        return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "layout": layout.__dict__,
                "gen_tokens": spec.gen_tokens, "rows": rows, "profiles": profiles, "failed": failed,
                "rounds": {"prefill": [len(pre_t["none"]), spec.repeats],
                           "generate": [len(gen_t["none"]), spec.gen_repeats]}}
