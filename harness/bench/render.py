"""The report: the Markdown rendering of a result, the methods CSV, the header and the files."""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
from pathlib import Path

import torch

from harness.bench.measure import cpu_model, loadavg
from harness.bench.setup import BUDGET_TOKENS, COMPOSITIONS, Spec
from harness.bench.sweep import render_sweep


# ---- report --------------------------------------------------------------------------------------------
#: how the methods part counted FLOPs (`Spec.counter`), for the report
COUNTERS = {None: "fvcore", "fvcore": "fvcore",
            "flop_counter_mode": "torch's FLOP formulas during a real forward (flop_counter_mode)"}


def _f(x, nd=2, pct=False) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if pct:
        return f"{100 * x:+.{nd}f} %"
    return f"{x:.{nd}f}"


def _q(q) -> str:
    return "-" if not q else f"{q[0]:.2f}-{q[1]:.2f}"


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


#: the program part of the commands older reports recorded (`meta.command`); the report prints the console script
_OLD_PROGRAMS = ("python -m harness.cli.bench", "python -m harness.bench")


def regenerate_command(meta: dict) -> str:
    """The command that regenerates a report: `vtbench-bench` with the recorded arguments (reports written
    before the console script was recorded name `python -m harness.bench`, a module that no longer runs)."""
    cmd = str(meta["command"])
    for old in _OLD_PROGRAMS:
        if cmd == old or cmd.startswith(old + " "):
            return "vtbench-bench" + cmd[len(old):]
    return cmd


def render(res: dict) -> str:
    m = res["meta"]
    L = []
    L.append(f"# vtbench performance benchmark — {m['machine']}")
    L.append("")
    L.append(f"Regenerate: `{regenerate_command(m)}` (`{m.get('make', 'make bench')}`). Ratios from one run; medians of interleaved "
             f"repetitions (the order of the contenders rotates every round). {m['note']}")
    L.append("")
    if m["device"] == "cpu" and not m.get("time_guard"):
        L.append("This is the CPU part of the benchmark. The GPU part (the full LLaVA-1.5-7B and LLaVA-NeXT-7B "
                 "architectures with random fp16 weights, every method) is `make bench-gpu` (`vtbench-bench "
                 "--gpu-full`) on a machine with a CUDA GPU (it writes its own reports, named after the GPU and the "
                 "architecture); no GPU was available to this run.")
        L.append("")
    L.append("| | |\n|---|---|")
    for k in ("date", "cpu", "device", "logical_cpus", "torch_threads", "clock", "dtype", "torch", "transformers",
              "git", "loadavg_start", "loadavg_end", "wall_seconds", "model", "repeats"):
        L.append(f"| {k} | {m.get(k)} |")
    L.append("")
    if m.get("time_guard"):
        tg = m["time_guard"]
        L.append(f"Unattended GPU run (`--gpu-full`): this architecture's share of the run's {tg['budget_s']:.0f} s "
                 f"time budget was {tg['share_s']:.0f} s; timing loops stop adding rounds (after at least one) and "
                 "whole steps are skipped when the next one would not fit. "
                 + ("Cut short by the budget: " + "; ".join(tg["events"]) + "." if tg["events"]
                    else "Nothing was cut short: every planned round ran."))
        L.append("")
    L.append("Load average is the 1/5/15-minute system load: a value above the thread count means other "
             "processes shared the CPU, which widens the spreads below (spread = (max-min)/median of the "
             "repetitions).")
    busy = [x for x in (m.get("loadavg_start") or [])[:1] + (m.get("loadavg_end") or [])[:1]]
    if m["device"] == "cpu" and busy and max(busy) > (m.get("logical_cpus") or 1) + 0.5 and "CPU" not in m["clock"]:
        L.append("")
        L.append(f"**Warning: the CPU was shared during this run (1-minute load {max(busy)} on "
                 f"{m.get('logical_cpus')} logical CPUs). With several torch threads, an oversubscribed CPU stalls "
                 "every parallel region, so times and ratios below are unreliable: rerun on an idle machine.**")
    L.append("")
    if "overhead" in res:
        o = res["overhead"]
        L.append("## Harness overhead (method `none`)")
        L.append("")
        L.append(f"Prompt: {o['prompt_tokens']} tokens. Direct = processor + `model(...)` forward (prefill) or "
                 f"`model.generate` ({o['gen_tokens']} tokens) on `from_pretrained` of the same checkpoint; harness = "
                 "`load_model` + `methods.build('none').apply` + `VTBenchLMM.generate_batch` (chat prompt, processor, "
                 "generate with logits, finiteness check, decoding), 1 new token for prefill.")
        L.append("")
        L.append("| phase | direct (s) | harness (s) | median ratio / ratio of medians | overhead | "
                 "spread direct / harness |")
        L.append("|---|---|---|---|---|---|")
        for ph in ("prefill", "generate"):
            r = o[ph]
            L.append(f"| {ph} | {r['direct_s']:.3f} | {r['harness_s']:.3f} | {r['ratio']:.4f} / "
                     f"{r.get('ratio_of_medians', r['ratio']):.4f} | "
                     f"{_f(r['overhead'], 2, pct=True)} | {_f(r['spread_direct'])} / {_f(r['spread_harness'])} |")
        L.append("")
        L.append("Overhead = the median over rounds of harness / direct in the same round (the two run back to back, "
                 "so a slow stretch of the machine hits both); the ratio of the two medians is beside it. The target "
                 "(3 %) is well inside the run-to-run spread of single timings on a shared CPU, which only the paired "
                 "ratio resolves.")
        L.append("")
        L.append(f"Target: prefill overhead < {100 * o['target']:.0f} % — **{'met' if o['prefill_overhead_ok'] else 'MISSED'}**. "
                 f"Same first token through both paths: {_f(o['same_first_token'])}. The harness generated "
                 f"{o['harness_generated_tokens']} of {o['gen_tokens']} tokens (it stops at EOS like any greedy `generate`; "
                 f"the direct call is forced to {o['gen_tokens']}): fewer means the generate row understates the overhead.")
        L.append("")
    if "methods" in res:
        mm = res["methods"]
        lay = mm["layout"]
        L.append("## Methods at a common budget (batch 1)")
        L.append("")
        L.append(f"Prompt: {mm['prompt_tokens']} tokens ({lay['before']} text + {lay['visual']} visual + "
                 f"{lay['after']} text). Budget: {round(BUDGET_TOKENS * lay['visual'])} of {lay['visual']} visual "
                 "tokens reaching the LLM (`budget.kind=tokens budget.value=0.3333`, harness/budget.py) for the "
                 "token methods; ShortV and RedundancyLens have no token budget (parameters below). "
                 "measured = the median over rounds of t(none) / t(method) in the same round (paired, so that a slow "
                 "stretch of the shared machine hits both sides; the ratio of the two medians is beside it, and "
                 "'ratio q1-q3' is the interquartile range of the per-round ratios); predicted = counted FLOPs(none) / FLOPs(method) "
                 f"({COUNTERS.get(m.get('counter'), COUNTERS[None])} on the patched model, FLOPs = 2 x MACs); "
                 "ratio = measured / predicted. Generation: "
                 f"{mm['gen_tokens']} new tokens = 1 prefill + {mm['gen_tokens'] - 1} decode steps, predicted from the "
                 "counted prefill + the analytic decode steps over the per-layer KV-cache lengths a real prefill "
                 "left (counted == analytic for decode is covered by tests/efficiency). GFLOP/s = counted prefill "
                 "FLOPs / median prefill time.")
        L.append("")
        rnd = next((r for r in mm["rows"] if r["method"] == "random"), None)
        L.append("| method | prefill GFLOPs | t prefill (s) | spread | measured | predicted | ratio | target | "
                 "ratio q1-q3 | ratio of medians | ratio / random's | gen t (s) | gen measured | gen predicted | "
                 "gen ratio | GFLOP/s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in mm["rows"]:
            tgt = "-" if r["target"] is None else f"≥ {r['target']:.2f} {'met' if r['target_met'] else '**MISSED**'}"
            vs = f"{r['prefill_ratio'] / rnd['prefill_ratio']:.2f}" if rnd and r["method"] not in ("none", "random") else "-"
            L.append(f"| {r['method']} | {r['prefill_flops'] / 1e9:.4g} | {r['prefill_s']:.3f} | "
                     f"{r['prefill_spread']:.2f} | {r['prefill_measured']:.2f} | {r['prefill_predicted']:.2f} | "
                     f"{r['prefill_ratio']:.2f} | {tgt} | {_q(r.get('prefill_ratio_q'))} | "
                     f"{_f(r.get('prefill_ratio_rom'))} | {vs} | {r['generate_s']:.3f} | {r['generate_measured']:.2f} | "
                     f"{r['generate_predicted']:.2f} | {r['generate_ratio']:.2f} | {r['prefill_gflops_per_s']:.1f} |")
        L.append("")
        for name, err in (mm.get("failed") or {}).items():
            L.append(f"**{name} FAILED** its trial generation on this device and is not in the table: {err}")
            L.append("")
        rounds = mm.get("rounds")
        if rounds and any(d < p for d, p in rounds.values()):
            L.append("Rounds run / planned: " + ", ".join(f"{k} {d}/{p}" for k, (d, p) in rounds.items())
                     + " (the time budget stopped the loop early).")
            L.append("")
        if any(r.get("kv_cache_bytes") is not None for r in mm["rows"]):
            L.append("Memory: KV cache = bytes of the keys and values a prefill leaves in the cache (every layer; "
                     "the generate steps add the new tokens); peak growth = peak memory during the method's first "
                     "timed call minus the memory in use before it (CUDA: `max_memory_allocated`; CPU: sampled RSS), "
                     "'-' where not recorded.")
            L.append("")
            L.append("| method | KV cache | cached tokens per layer (min-max) | prefill peak growth | "
                     "generate peak growth |")
            L.append("|---|---|---|---|---|")
            for r in mm["rows"]:
                kv = r.get("kv_lengths") or [0]
                L.append(f"| {r['method']} | {_mb(r.get('kv_cache_bytes'))} | {min(kv)}-{max(kv)} | "
                         f"{_mb(r.get('prefill_peak_mem_bytes'))} | {_mb(r.get('generate_peak_mem_bytes'))} |")
            L.append("")
        if rnd:
            L.append(f"`random` drops tokens at the LLM input with no scoring and no bookkeeping after it: its ratio "
                     f"({rnd['prefill_ratio']:.2f}) is the structural part of the gap on this machine, the costs that do "
                     "not shrink with the token count (per-layer weight streaming at batch 1, kernel and Python "
                     "dispatch, embedding and lm_head) plus the lower GFLOP/s of shorter matrices. 'ratio / random's' "
                     "is what is left for each method's own work (scoring, merging, gathers): 1.00 means none.")
            L.append("")
        L.append("Parameters (method.describe()) and counting checks (prefill counted == analytic):")
        L.append("")
        for r in mm["rows"]:
            L.append(f"- `{r['description']}` — counted == analytic: {_f(r['counted_equals_analytic'])}"
                     + (f"; unsupported ops: {r['unsupported_ops']}" if r["unsupported_ops"] else ""))
        L.append("")
        L.append("ShortV: the paper's LLaVA-1.5-7B layer list mapped to this model's depth (i -> floor(i·L/32), "
                 "duplicates dropped), first round(19/32·L) layers (a random model cannot be calibrated "
                 "meaningfully). RedundancyLens: Hollow Attention and the probe-activated FFN on the second half "
                 "of the layers (about half, as the paper says; the choice does not change FLOPs), window scaled "
                 "as 256/576 of the visual tokens. FiCoCo-V/VL start merging at half the CLIP depth "
                 "(the paper: 12 of 24).")
        if any(r["method"] in COMPOSITIONS for r in mm["rows"]):
            L.append("Compositions (methods/compose.py): the ShortV / RedundancyLens layers above without FastV's "
                     "scoring layer 1, then FastV (K=2) whose keep the common budget sets.")
        L.append("")
        if mm["profiles"]:
            L.append("### Profile of the methods under target")
            L.append("")
            clock = next(iter(mm["profiles"].values())).get("time", "self CPU time")
            L.append(f"One prefill under torch.profiler per method beside one of `none`; {clock} by operator "
                     "class (matmul = linear/mm/bmm/conv; attention = SDPA/softmax; gather/index/copy = the "
                     "bookkeeping of reductions: index, gather, scatter, cat, sort/topk, copies).")
            L.append("")
            L.append("| method | total ms | matmul | attention | gather/index/copy | other | top operators (self ms) |")
            L.append("|---|---|---|---|---|---|---|")
            for name, p in mm["profiles"].items():
                g = p["groups_ms"]
                top = ", ".join(f"{t['op']} {t['self_ms']:.0f}" for t in p["top"][:5])
                L.append(f"| {name} | {p['total_ms']:.0f} | {g['matmul']:.0f} | {g['attention']:.0f} | "
                         f"{g['gather/index/copy']:.0f} | {g['other']:.0f} | {top} |")
            L.append("")
            L.append(explain_misses(mm))
            L.append("")
    if "scores" in res:
        s = res["scores"]
        L.append("## Attention scores: SDPA + rows (ours) vs materialised attention weights (reference style)")
        L.append("")
        L.append(f"Prompt: {s['prompt_tokens']} tokens, one prefill. 'eager on scoring layers': the method's "
                 "scoring layers run eager attention and keep their [B, H, n, n] weights (the released code reads "
                 "scores from them; our row computation still runs, H·n·d MACs, negligible); 'eager everywhere + "
                 "output_attentions': the whole model on eager attention returning every layer's weights, as a "
                 "model loaded with attn_implementation='eager' and called with output_attentions=True does. "
                 "Peak memory: sampled RSS growth during the first (warm-up) prefill of each variant (CPU; the allocator "
                 "may reuse memory freed earlier, so small values are lower bounds) or max allocated (CUDA).")
        L.append("")
        for name, d in s["methods"].items():
            L.append(f"**{name}** (`{d['description']}`; scoring layers {d['scoring_layers']}, eager weights kept "
                     f"from {d['weights_kept_scoring_layers']} of them; {d['attention_maps_returned']} maps returned with "
                     f"output_attentions; one layer's "
                     f"weights {_mb(d['one_layer_attention_bytes'])}, all layers at full length "
                     f"{_mb(d['all_layers_attention_bytes'])}, returned by output_attentions on the reduced model "
                     f"{_mb(d.get('returned_attention_bytes'))})")
            L.append("")
            L.append("| variant | prefill (s) | vs ours | spread | peak memory growth | max logit diff vs ours |")
            L.append("|---|---|---|---|---|---|")
            for k, v in d["variants"].items():
                diff = v.get("max_abs_logit_diff_vs_ours")
                L.append(f"| {k} | {v['s']:.3f} | {v['vs_ours']:.3f} | {v['spread']:.2f} | "
                         f"{_mb(v['peak_mem_delta_bytes'])} | {'-' if diff is None else f'{diff:.1e}'} |")
            if d["error_output_attentions"]:
                L.append("")
                L.append(f"output_attentions=True failed on the patched eager model: {d['error_output_attentions']}")
            L.append("")
    if "batch" in res:
        b = res["batch"]
        L.append(f"## Batched evaluation (lmms-eval wrapper, left padding, batch {b['batch']} vs 1)")
        L.append("")
        L.append(f"{b['batch']} prompts of different lengths, {b['new_tokens']} new tokens each, through "
                 "`VTBenchLMM.generate_batch` (greedy). Throughput ratio = time of the batch-1 calls / time of one "
                 "batched call. The equality of predictions at batch 8 and 1 for every method is also a test "
                 "(tests/test_batched_eval.py, through `run_cell`).")
        L.append("")
        L.append("| method | prompt lengths | batch 1 (s) | batched (s) | throughput ratio | same predictions |")
        L.append("|---|---|---|---|---|---|")
        for name, d in b["methods"].items():
            L.append(f"| {name} | {min(d['prompt_lengths'])}-{max(d['prompt_lengths'])} | {d['batch1_s']:.3f} | "
                     f"{d['batchB_s']:.3f} | {d['throughput_ratio']:.2f} | "
                     f"{_f(d['same_predictions'])}{'' if d['same_predictions'] else ' (' + str(d['n_different']) + ' differ)'} |")
        L.append("")
    if "flops" in res:
        fl = res["flops"]
        L.append(f"## Counting speed: `vtbench-flops model={fl['model']}` (subprocess wall time)")
        L.append("")
        L.append(f"Median of {fl.get('repeats', 1)} runs per method, round-robin (each round runs every method "
                 "and the import floor once, the order rotating, so a slow stretch of the machine does not fall "
                 "on one method's runs); this part runs first, before the timing parts load the machine. "
                 "All runs are listed in round order.")
        L.append("")
        L.append("| method | arguments | wall s | all runs (s) | CPU s | setup s | count s | source | counted == analytic "
                 "| predicted prefill speed-up |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in fl["rows"]:
            t = r.get("timing", {})
            L.append(f"| {r['method']} | `{r['args']}` | {r['seconds']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in r.get('seconds_all', [r['seconds']]))} | "
                     f"{r.get('cpu_seconds', 0):.1f} | {_f(t.get('setup'), 1)} | {_f(t.get('count'), 1)} | "
                     f"{r.get('source', r.get('error', '-'))} | {_f(r.get('match'))} | {_f(r.get('predicted_speedup'))} |")
        L.append("")
        L.append("wall = the whole command (interpreter start, imports, config, counting, exit); CPU = its user + "
                 "system CPU time; setup = the tool's own timer from parsing the overrides to the meta-device model "
                 "(Hydra, the transformers config and modeling imports, the model); count = the counted prefill "
                 "and decode forwards (0 where the method reads values and its analytic numbers are shown; on the "
                 "meta device an op costs Python time, not arithmetic, and the counter reuses the output shapes "
                 "of ops it has already seen on the same operand shapes, see harness/efficiency/flops.py).")
        if "import_floor_s" in fl:
            L.append(f"Import floor: `python -c \"{fl['import_floor_cmd']}\"` takes **{fl['import_floor_s']:.1f} s** "
                     f"(runs: {', '.join(f'{x:.1f}' for x in fl['import_floor_all'])}): the part of every count that "
                     "no code of vtbench runs in.")
        notes = sorted({n for r in fl["rows"] for n in r.get("notes", []) if "meta device" in n})
        for n in notes:
            L.append(f"- note from vtbench-flops: {n} ({', '.join(r['method'] for r in fl['rows'] if n in r.get('notes', []))})")
        L.append("")
        L.append(f"Target: every count under {fl['limit_s']:.0f} s — wall time: "
                 f"**{'met' if fl['all_under_limit'] else 'MISSED'}**; CPU time: "
                 f"**{'met' if all(r.get('cpu_seconds', 1e9) < fl['limit_s'] and r['rc'] == 0 for r in fl['rows']) else 'MISSED'}**.")
        L.append("")
    if "sweep" in res:
        L += render_sweep(res["sweep"])
    return "\n".join(L) + "\n"


def explain_misses(mm: dict) -> str:
    """Where the time of each method under target goes, relative to what its FLOPs predict."""
    rows = {r["method"]: r for r in mm["rows"]}
    pn = mm["profiles"]["none"]
    out = ["Time per component (one prefill, forward hooks; expected = `none`'s time for the component x the "
           "method's counted FLOPs of that component / `none`'s; GFLOP/s = counted FLOPs / time):", "",
           "| method | component | time (s) | expected (s) | excess (s) | GFLOP/s |", "|---|---|---|---|---|---|"]
    fn_ = rows["none"]["prefill_flops_by_component"]
    for name, p in mm["profiles"].items():
        ct, tn = p.get("components_s"), pn.get("components_s")
        if not ct or not tn:
            continue
        fm = rows[name]["prefill_flops_by_component"]
        for c in ("vision", "projector", "llm", "lm_head", "outside"):
            t = ct.get(c, 0.0)
            if c == "outside":
                exp, gfs = tn["outside"], None
            else:
                exp = tn[c] * (fm.get(c, 0) / fn_[c]) if fn_.get(c) else 0.0
                gfs = fm.get(c, 0) / t / 1e9 if t > 0 else None
            out.append(f"| {name} | {c} | {t:.3f} | {exp:.3f} | {t - exp:+.3f} | {_f(gfs, 1)} |")
    out += ["", "Gap analysis by operator class (from the profile: the time each class would take if it scaled "
            "with the predicted speed-up, vs what it took):", ""]
    for name, p in mm["profiles"].items():
        if name == "none":
            continue
        pred = rows[name]["prefill_predicted"]
        expected = {g: v / pred for g, v in pn["groups_ms"].items()}
        excess = {g: p["groups_ms"][g] - expected[g] for g in expected}
        worst = sorted(excess.items(), key=lambda kv: -kv[1])
        parts = ", ".join(f"{g} {v:+.0f} ms" for g, v in worst)
        mat_eff = (pn["groups_ms"]["matmul"] / pred) / p["groups_ms"]["matmul"] if p["groups_ms"]["matmul"] else 0
        out.append(f"- **{name}**: profiled {p['total_ms']:.0f} ms vs {pn['total_ms'] / pred:.0f} ms expected from "
                   f"`none`'s profile / {pred:.2f}; excess by class: {parts}. Matmul time scales at "
                   f"{mat_eff:.2f} of the FLOPs prediction (below 1: smaller matrices run at a lower GFLOP/s).")
        ow = p.get("own_work")
        rnd = rows.get("random")
        if ow and ow["total_s"] > 0:
            share = ow["own_s"] / ow["total_s"]  # applied to the interleaved medians of the table above
            rest = rows["none"]["prefill_s"] / max(rows[name]["prefill_s"] * (1 - share), 1e-9) / pred
            out.append(f"  The method's own per-layer work (its reduction plan's scoring and merging calls: "
                       f"attention rows and their softmax, top-k, quantiles, weighted merges, index bookkeeping) "
                       f"takes {ow['own_s']:.3f} s of a {ow['total_s']:.3f} s prefill "
                       f"({100 * ow['own_s'] / ow['total_s']:.1f} %); the rest of the prefill alone would reach a "
                       f"ratio of {rest:.2f}"
                       + (f" (random, which has no such work: {rnd['prefill_ratio']:.2f})" if rnd else "")
                       + ". The work is part of the method's definition (scores from every merge layer's own "
                       "attention), element-wise and memory-bound, so FLOPs, which count matrix products only, "
                       "cannot predict it: that share of the gap is structural.")
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = ["method", "description", "prefill_flops", "prefill_s", "prefill_spread", "prefill_measured",
            "prefill_predicted", "prefill_ratio", "prefill_ratio_rom", "target", "target_met", "generate_flops", "generate_s",
            "generate_spread", "generate_measured", "generate_predicted", "generate_ratio",
            "counted_equals_analytic", "kv_cache_bytes", "prefill_peak_mem_bytes", "generate_peak_mem_bytes"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    from harness.paths import atomic_write

    atomic_write(path, buf.getvalue())


def bench_meta(spec: Spec, machine: str, command: str, clock: str, model: str) -> dict:
    """The report's header: machine, software, settings."""
    import transformers

    from harness.environment import git_state

    git = git_state()
    return {
        "machine": machine, "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "device": spec.device if not spec.device.startswith("cuda") else torch.cuda.get_device_name(),
        "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "dtype": spec.dtype,
        "clock": "process CPU time (time.process_time)" if clock == "cpu" else "wall time (time.perf_counter)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "git": f"{(git.get('sha') or '?')[:10]}{' (dirty)' if git.get('dirty') else ''}",
        "loadavg_start": loadavg(), "quick": spec.quick, "model": model, "counter": spec.counter,
        "repeats": f"prefill {spec.repeats}, generate / scores {spec.gen_repeats}, batch {max(1, spec.gen_repeats // 2)}",
        "note": "QUICK MODE (tiny model, smoke test): these numbers mean nothing." if spec.quick else "",
    }


def write_report(res: dict, stem: Path) -> dict:
    """`<stem>.md` (the report), `.json` (everything) and `.csv` (the methods table, when run); the paths.
    The suffixes are appended, never substituted (a machine named `v1.2` keeps its `.2`)."""
    stem = Path(stem)
    if stem.name in ("", ".", ".."):
        raise ValueError(f"bench report name {str(stem)!r}: not a file name")
    path = {ext: stem.parent / f"{stem.name}.{ext}" for ext in ("md", "json", "csv")}
    from harness.paths import all_or_nothing, atomic_write

    stem.parent.mkdir(parents=True, exist_ok=True)
    with all_or_nothing():  # the three files are replaced together, or none is
        atomic_write(path["md"], render(res))
        atomic_write(path["json"], json.dumps(res, indent=1, default=str))
        if "methods" in res:
            write_csv(path["csv"], res["methods"]["rows"])
    return {"md": str(path["md"]), "json": str(path["json"]), "csv": str(path["csv"]) if "methods" in res else None}
