"""The ``scores`` part: attention scores beside SDPA (ours) versus materialised eager attention
weights (the reference approach)."""
from __future__ import annotations

import gc

import torch

from harness.bench.measure import interleaved, med, spread
from harness.bench.setup import make_image, make_question, method_settings, share_weights_copy


class ScoresPart:
    """The scores part of `Bench` (a mixin: the shared inputs are `Bench`'s)."""

    # scores ----------------------------------------------------------------------------------------------
    def scores(self, names=("fastv", "ficoco_l")) -> dict:
        from harness.models import get_adapter

        spec = self.spec
        base, processor = self.base
        inputs = self.encode(processor, [make_question(spec.text_words)], [make_image(0, self.image_size)])
        n = int(inputs["input_ids"].shape[1])
        out = {"prompt_tokens": n, "methods": {}}
        settings = {s[0]: s for s in method_settings(get_adapter(base), ("none",) + tuple(names))}
        none_m = share_weights_copy(base)
        for name in names:
            _, method, _, = settings[name]
            ours = share_weights_copy(base)
            method.apply(ours, get_adapter(ours))
            layers = scoring_layers(method, get_adapter(ours).num_llm_layers)
            ref_layer = share_weights_copy(base)
            method.apply(ref_layer, get_adapter(ref_layer))
            keep_eager_weights(ref_layer, layers)
            ref_all = share_weights_copy(base)
            ref_all.set_attn_implementation("eager")
            method.apply(ref_all, get_adapter(ref_all))
            variants = {"none (sdpa)": (none_m, {}), "ours (sdpa + rows)": (ours, {}),
                        "eager on scoring layers": (ref_layer, {}),
                        "eager everywhere + output_attentions": (ref_all, {"output_attentions": True})}
            fns = {}
            weights_seen: dict[int, int] = {}
            logits: dict[str, torch.Tensor] = {}
            for label, (m, extra) in variants.items():
                def f(m=m, extra=extra, label=label):
                    with torch.inference_mode():
                        o = m(**inputs, use_cache=True, logits_to_keep=1, **extra)
                        logits[label] = o.logits[:, -1].float()
                        kept = getattr(m, "_vtbench_bench_weights", None)
                        if kept is not None:
                            weights_seen[id(m)] = len(kept)
                            kept.clear()
                        return o
                fns[label] = f
            error = None
            try:
                with torch.inference_mode():
                    check = ref_all(**inputs, use_cache=True, logits_to_keep=1, output_attentions=True)
                maps = [a for a in (check.attentions or ()) if a is not None]
                n_att = len(maps)
                returned_bytes = sum(a.numel() * a.element_size() for a in maps)
                del check, maps
            except Exception as e:  # noqa: BLE001 - reported, the variant is dropped
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                fns.pop("eager everywhere + output_attentions")
                n_att, returned_bytes = 0, None
            self.log(f"scores: {name}")
            mem: dict[str, int] = {}
            times = interleaved(fns, spec.gen_repeats, device=spec.device, log=self.log, memory=mem,
                                stop=self._stop(f"scores: {name}", spec.gen_repeats, 0.5))
            t_ours = med(times["ours (sdpa + rows)"])
            ours_logits = logits["ours (sdpa + rows)"]
            diffs = {k: float((v - ours_logits).abs().max()) for k, v in logits.items() if k != "none (sdpa)"}
            H = base.config.text_config.num_attention_heads
            L = base.config.text_config.num_hidden_layers
            elem = torch.finfo(getattr(torch, spec.dtype)).bits // 8
            out["methods"][name] = {
                "description": method.describe(), "scoring_layers": layers,
                "variants": {k: {"s": med(v), "spread": spread(v), "vs_ours": med(v) / t_ours,
                                 "max_abs_logit_diff_vs_ours": diffs.get(k),
                                 "peak_mem_delta_bytes": mem[k], "times": v} for k, v in times.items()},
                "attention_maps_returned": n_att, "error_output_attentions": error,
                "weights_kept_scoring_layers": weights_seen.get(id(ref_layer), 0),
                "one_layer_attention_bytes": H * n * n * elem, "all_layers_attention_bytes": L * H * n * n * elem,
                "returned_attention_bytes": returned_bytes,
            }
            del ours, ref_layer, ref_all
            gc.collect()
        return out


def scoring_layers(method, num_layers: int) -> list[int]:
    """Decoder layers whose attention the method scores from (the reference code materialises their
    attention weights)."""
    if method.name == "fastv":
        return [method.K - 1]
    if method.name == "ficoco_l":
        return list(method.merge_layers(num_layers))
    return []


def keep_eager_weights(model, layers: list[int]) -> None:
    """Reference-style scoring on `layers`: their attention runs eagerly and its weights [B, H, n, n] are
    kept until the forward ends (the released code reads scores from them); other layers stay on SDPA."""
    from harness.models import get_adapter

    adapter = get_adapter(model)
    store: list = []
    model._vtbench_bench_weights = store
    for i in layers:
        attn = adapter.llm_layers[i].self_attn
        cfg = attn.config

        def pre(_m, args, kwargs, cfg=cfg):
            _m._bench_saved_impl = cfg._attn_implementation
            cfg._attn_implementation = "eager"
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _additive_mask(kwargs.get("attention_mask"), args, kwargs)
            return args, kwargs

        def post(_m, _a, out, cfg=cfg):
            cfg._attn_implementation = _m._bench_saved_impl
            if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
                store.append(out[1])

        attn.register_forward_pre_hook(pre, with_kwargs=True)
        attn.register_forward_hook(post)


def _additive_mask(mask, args, kwargs):
    """The SDPA-style mask of a layer (None = causal, or boolean) as the additive float mask eager attention
    takes, so the eager scoring layer computes the same attention (prefill with an empty cache)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    hs = kwargs.get("hidden_states", args[0] if args else None)
    dtype = hs.dtype
    if mask is None:
        n = hs.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=hs.device).tril()[None, None]
    neg = torch.finfo(dtype).min
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, neg)
