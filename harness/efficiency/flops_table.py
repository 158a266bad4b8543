"""What `vtbench-flops` computes and prints: FLOPs of a model x method per component, without
loading weights (`compute`, a JSON-able dict) and its text table (`render_table`). The command line
and the counting rules are in `harness.cli.flops`."""
from __future__ import annotations

from typing import Any


class CliError(ValueError):
    """A one-line error for the user."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def compute(overrides: list[str], *, text_tokens: int = 64, convention: str = "full",
            image: tuple[int, int] | None = None) -> dict[str, Any]:
    """Everything `vtbench-flops` prints, as a JSON-able dict."""
    import time

    import methods
    from harness.config import ConfigError, compose_config, validate
    from harness.efficiency import conventions as C
    from harness.efficiency import flops as F
    from harness.models import get_adapter
    from harness.models.adapter import NotApplicable
    from harness.models.loading import ModelLoadError, config_from_cfg, meta_model

    t0 = time.perf_counter()
    try:
        cfg = compose_config(overrides)
    except ConfigError as e:
        raise CliError(str(e)) from None
    try:  # every value checked as `vtbench` does (type, range, finiteness); the device is not used here
        method = validate(cfg, check_device=False)
    except (ConfigError, methods.MethodError) as e:
        raise CliError(str(e)) from None
    try:
        config = config_from_cfg(cfg.model)
        model = meta_model(config)
        adapter = get_adapter(model)
    except (ModelLoadError, NotApplicable, ValueError) as e:
        raise CliError(str(e)) from None
    try:
        method.validate(adapter)
    except (methods.MethodError, NotApplicable) as e:
        raise CliError(str(e)) from None
    budget_info = _apply_budget(cfg, method, adapter, text_tokens)
    if budget_info:
        method = budget_info.pop("_method")

    layout_kw = dict(text_before=1, text_after=text_tokens - 1, image_hw=image)
    layout = F.synthetic_layout(config, **layout_kw)
    inputs = F.synthetic_inputs(config, **layout_kw)
    try:
        analytic = F.analytic_prefill(config, layout, None if method.name == "none" else method)
    except methods.MethodError as e:  # e.g. counts that depend on the data (SparseVLM mode=rank)
        raise CliError(str(e)) from None
    context = layout.total  # dense cache length after the prefill
    per_layer = _visual_per_layer(config, layout, method)

    notes: list[str] = []
    prefill = decode = None
    t_setup = time.perf_counter()
    if not method.meta_countable:
        notes.append("the method reads tensor values while it runs (the visual-token positions in input_ids), "
                     "so it cannot run on the meta device: analytic numbers shown")
    else:
        try:
            model = method.apply(model, adapter) or model
            prefill, decode = F.count_prefill_and_decode(model, inputs)
        except Exception as e:  # a method whose code needs values although it claims it does not
            notes.append(f"counting on the meta device failed ({_first_line(e)}); analytic numbers shown")
    t_count = time.perf_counter()
    kv_lengths = None
    if decode is not None:
        context, kv_lengths = decode.context, decode.kv_lengths
    analytic_dec = F.analytic_decode(config, context, kv_lengths=kv_lengths)
    if method.name != "none" and decode is None:
        notes.append("decode analytic assumes the dense cache length (the method may shrink it)")

    def block(counted, analytic_flops, phase):
        comps = list(F.COMPONENTS) + ([k for k in counted.flops if k not in F.COMPONENTS] if counted else [])
        rows = {}
        for c in comps:
            a = analytic_flops.get(c)
            n = counted.flops.get(c) if counted is not None else None
            rows[c] = {"counted": n, "analytic": a, "match": (n == a) if (n is not None and a is not None) else None}
        total_a = int(sum(analytic_flops.values()))
        total_c = counted.total if counted is not None else None
        return {
            "phase": phase,
            "source": "counted" if counted is not None else "analytic",
            "counter": counted.counter if counted is not None else "analytic",
            "components": rows,
            "total": {"counted": total_c, "analytic": total_a,
                      "match": (total_c == total_a) if total_c is not None else None},
        }

    from harness.efficiency.analytic import ModelShapes

    try:  # the method's own selection cost (e.g. FastV's score row), in MACs
        schedule = None if method.name == "none" else method.llm_visual_schedule(ModelShapes.from_config(config), layout)
    except methods.MethodError:
        schedule = None

    conv = {}
    for name in C.CONVENTIONS:
        try:
            conv[name] = C.evaluate(name, config, layout=layout, method=None if method.name == "none" else method)
            dense = C.evaluate(name, config, layout=layout, method=None)["total"]
            conv[name].update(dense_total=dense, ratio=conv[name]["total"] / dense if dense else None)
        except Exception as e:  # a method may not support a convention's synthetic layout
            conv[name] = {"convention": name, "error": _first_line(e)}
    return {
        "model": str(cfg.model.name),
        "method": method.describe(),
        "layout": {"before": layout.before, "visual": layout.visual, "after": layout.after,
                   "images": layout.images, "total": layout.total,
                   "image_hw": list(image or F.default_image_hw(config))},
        # visual tokens reaching the LLM for this prompt (the budget count: after the method's reduction, a
        # multi-stage method's first drop), the visual tokens alive at each decoder layer's input and their
        # layer average (the papers' "equivalent tokens"), and the method's own selection MACs
        "visual_tokens_to_llm": method.visual_tokens_kept(layout),
        "visual_tokens_per_layer": per_layer,
        "visual_tokens_mean_per_layer": round(sum(per_layer) / len(per_layer), 2) if per_layer else None,
        "selection_macs": schedule[1] if schedule is not None else 0,
        "method_params": method.params(),
        "budget": budget_info or None,
        "unit": "FLOPs (= 2 x MACs)",
        "prefill": block(prefill, analytic, "prefill"),
        "decode": block(decode, analytic_dec, "decode"),
        "convention": convention,
        "conventions": conv,
        "rules": (
            "FLOPs = 2 x MACs of matrix products (linear layers, convolution, attention QK^T and AV over the "
            "full n x n, no causal halving); element-wise ops (norms, activations, softmax, RoPE) not counted; "
            "prefill = the prompt with logits for the last position only; decode = one token with the prompt "
            "cached; batch 1; counted with torch.utils.flop_counter's formulas on the meta device"
        ),
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
        # where the time went: imports (hydra, transformers) + config + meta model; the counted forwards;
        # the analytic formulas and conventions
        "timing": {"setup": round(t_setup - t0, 2), "count": round(t_count - t_setup, 2),
                   "analytic": round(time.perf_counter() - t_count, 2)},
    }


def _apply_budget(cfg, method, adapter, text_tokens: int) -> dict:
    """`budget.kind` / `budget.value` of the composed config applied to `method` (harness.budget), so the
    counts are those of the method a `vtbench` cell with the same overrides runs. {} without a budget;
    else the budget info with the resolved method under `_method`."""
    from omegaconf import OmegaConf

    from harness import budget as B

    raw = cfg.get("budget")
    budget = OmegaConf.to_container(raw, resolve=True) if raw is not None else None
    if not budget or budget.get("kind") is None or method.name == "none":
        return {}
    budget.setdefault("text_tokens", text_tokens)
    try:
        m, info = B.resolve(method, adapter, budget)
    except B.BudgetError as e:
        raise CliError(str(e)) from None
    return dict(info, _method=m)


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4e}"


def _visual_per_layer(config, layout, method) -> list[int] | None:
    """Visual tokens at each decoder layer's input for an in-LLM method (`Method.llm_visual_schedule`),
    the visual tokens reaching the LLM at every layer otherwise; None for a method whose schedule has no
    analytic form (it says why in its FLOPs notes)."""
    from harness.efficiency import analytic as A
    from methods.base import MethodError

    shapes = A.ModelShapes.from_config(config)
    try:
        schedule = method.llm_visual_schedule(shapes, layout) if method.name != "none" else None
        visual = method.visual_tokens_to_llm(layout.visual) if method.name != "none" else layout.visual
    except MethodError:
        return None
    return list(schedule[0]) if schedule is not None else [int(visual)] * shapes.llm.layers


def render_table(r: dict) -> str:
    lay = r["layout"]
    lines = [
        f"vtbench-flops  model={r['model']}  method={r['method']}",
        f"prompt: {lay['before']} text + {lay['visual']} image + {lay['after']} text = {lay['total']} tokens; "
        f"{lay['images']} vision-encoder pass(es) of a {lay['image_hw'][0]}x{lay['image_hw'][1]} image; "
        f"{r['visual_tokens_to_llm']} visual tokens reach the LLM",
    ]
    per_layer = r.get("visual_tokens_per_layer")
    if per_layer and len(set(per_layer)) > 1:
        runs, start = [], 0
        for i in range(1, len(per_layer) + 1):
            if i == len(per_layer) or per_layer[i] != per_layer[start]:
                runs.append(f"layers {start}-{i - 1}: {per_layer[start]}" if i - 1 > start else f"layer {start}: {per_layer[start]}")
                start = i
        lines.append(f"visual tokens per layer: {'; '.join(runs)} (mean {r['visual_tokens_mean_per_layer']})")
    lines += [
        "",
        f"{'component':<11}{'prefill counted':>17}{'prefill analytic':>18}{'decode/token counted':>22}"
        f"{'decode analytic':>17}",
    ]
    pre, dec = r["prefill"], r["decode"]
    comps = list(dict.fromkeys(list(pre["components"]) + list(dec["components"])))
    for c in comps + ["total"]:
        p = pre["total"] if c == "total" else pre["components"].get(c, {})
        d = dec["total"] if c == "total" else dec["components"].get(c, {})
        lines.append(
            f"{c:<11}{_fmt(p.get('counted')):>17}{_fmt(p.get('analytic')):>18}{_fmt(d.get('counted')):>22}"
            f"{_fmt(d.get('analytic')):>17}"
        )
    ok = [b["total"]["match"] for b in (pre, dec)]
    lines.append("")
    lines.append(
        f"source: prefill {pre['source']}, decode {dec['source']}; counted == analytic: "
        + ", ".join(f"{n} {'yes' if m else ('-' if m is None else 'NO')}" for n, m in zip(("prefill", "decode"), ok))
    )
    name = r["convention"]
    conv = r["conventions"].get(name, {})
    if name != "full":
        if "error" in conv:
            lines.append(f"convention {name}: {conv['error']}")
        else:
            unit = 1e9 if name == "fastv" else 1e12
            label = {"fastv": "B (MACs, as FastV prints them)", "divprune": "T (MACs, as DivPrune prints them)"}.get(
                name, "TFLOPs")
            ratio = f" = {100 * conv['ratio']:.1f} % of {conv['dense_total'] / unit:.2f} (none)" if conv.get("ratio") else ""
            if "paper_ratio" in conv and conv.get("ratio"):
                ratio += f"; mean of per-benchmark ratios {100 * conv['paper_ratio']:.1f} %"
            lines.append(f"convention {name}: {conv['total'] / unit:.2f} {label}{ratio} — {conv['description']}")
            if "label_total" in conv:
                lines.append(f"convention {name}, budget label: {conv['label_total'] / unit:.2f} {label} "
                             f"({conv['label_visual']} visual tokens) — {conv['label_note']}")
    lines.append(f"Counting rules: {r['rules']}.")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
