"""The embedded model's card: `harness/assets/tiny-llava/README.md`, rendered from its training info, its
scores (`make tiny-model`: scores.json), its measured properties (`make tiny-model-card --write`:
properties.json) and the committed `make eval` table's retentions. The property thresholds live here, so
the measuring script (`card.py`) and the card share one list."""
from __future__ import annotations

import json
from pathlib import Path

# (key, description, threshold text, test on the value)
PROPERTIES = [
    ("patches_per_object", "objects cover at least 4 patches on average", ">= 4",
     lambda v: v >= 4),
    ("colour_probe_any_token", "a linear probe reads a shape's colour from any token it covers", ">= 0.9",
     lambda v: v >= 0.9),
    ("drop_best_token_retention", "removing the asked object's most informative token keeps the accuracy",
     ">= 0.9", lambda v: v >= 0.9),
    ("permute_renumber_retention", "visual tokens permuted and renumbered keep the accuracy", ">= 0.9",
     lambda v: v >= 0.9),
    ("random33_renumbered_vs_kept", "random 33 %: renumbered accuracy / positions-kept accuracy", ">= 0.9",
     lambda v: v >= 0.9),
    ("random33_retention", "random 33 % (renumbered, 3 seeds) keeps a real image's share of the accuracy",
     "0.85-0.95", lambda v: 0.85 <= v <= 0.95),
    ("background_nn_cosine", "background tokens are near-duplicates (mean nearest-neighbour cosine)",
     ">= 0.95", lambda v: v >= 0.95),
    ("accuracy", "exact match on the full test split (harness path)", ">= 0.85", lambda v: v >= 0.85),
    ("min_type_accuracy", "the weakest question type", ">= 0.60", lambda v: v >= 0.60),
    ("prior_over_accuracy", "answer prior / accuracy", "<= 0.5", lambda v: v <= 0.5),
    ("blank_over_accuracy", "blank image / accuracy", "<= 0.5", lambda v: v <= 0.5),
]



def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def table(after: dict, before: dict | None) -> list[str]:
    head = "| property | threshold | before | after | holds |" if before else "| property | threshold | value | holds |"
    lines = [head, "|---|---|---|---|---|" if before else "|---|---|---|---|"]
    for key, desc, thr, ok in PROPERTIES:
        v = after[key]
        cells = [f"{desc} (`{key}`)", thr] + ([_fmt(before.get(key))] if before else []) + [_fmt(v),
                                                                                           "yes" if ok(v) else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


#: train.py arguments that do not change the trained weights
_NOT_RECIPE = {"out", "seed", "smoke", "no_bar", "save_stage1", "load_stage1", "checkpoint_every_eval", "val_n",
               "eval_every", "log_every", "config", "steps2"}


def recipe_flags(args: dict, steps2) -> list[str]:
    """The train.py flags of a run (from train_info.json's string-valued args) that differ from the
    defaults, with `--steps2` set to the steps actually done."""
    from harness.tiny_model import train

    defaults = vars(train.parse_args([]))
    out = [f"--steps2 {steps2}"]
    for k, v in args.items():
        if k in _NOT_RECIPE or k not in defaults or str(defaults[k]) == v:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(defaults[k], bool):
            out += [flag] if v == "True" else []
        else:
            out.append(f"{flag} {v}")
    return out


RETENTION_TABLE = Path(__file__).resolve().parents[2] / "results" / "tables" / "tiny_shapes_limit200.csv"


def property_lines(model_dir: Path) -> list[str]:
    """The model card's property table from `properties.json` (written by `make tiny-model-card`)."""
    path = Path(model_dir) / "properties.json"
    try:
        data = json.loads(path.read_text())
        lines = table(data["after"], data.get("before"))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    before = data.get("before") or {}
    after = data["after"]
    lines = ["## Properties (`make tiny-model-card`)", "",
             f"Measured by `harness/tiny_model/card.py` on the `shapes` test split (n={after.get('n')}); "
             + (f"*before*: the previous checkpoint on the generator it was trained for (shapes "
                f"{before.get('generator_version')}), *after*: this one (shapes {after.get('generator_version')})."
                if before else "") , "", *lines, ""]
    extra = [("colour probe on every token an object touches (any of its pixels)", "colour_probe_touching"),
             ("random 33 %, positions kept", "random33_kept_accuracy"),
             ("random 33 %, renumbered", "random33_renumbered_accuracy"),
             ("visual tokens permuted + renumbered", "permuted_accuracy"),
             ("the decoder on all tokens (the probes' reference)", "full_decoder_accuracy"),
             ("asked object's most informative token removed", "drop_best_token_accuracy"),
             ("blank image", "blank_accuracy"), ("answer prior", "prior_accuracy")]
    lines += ["| measurement | before | after |", "|---|---|---|"]
    for label, key in extra:
        b = before.get(key)
        lines.append(f"| {label} | {'-' if b is None else f'{b:.3f}'} | {after.get(key, float('nan')):.3f} |")
    lines += ["", "Per question type (harness path): " + ", ".join(
        f"{k} {v:.3f}" for k, v in after.get("per_type", {}).items()), ""]
    return lines


def retention_lines(csv_path: Path) -> list[str]:
    """Each method's retention (accuracy / `none`) at the default budgets, from the committed `make eval` table."""
    import pandas as pd

    try:
        df = pd.read_csv(csv_path, comment="#", dtype=str)
    except (OSError, ValueError):
        return []
    if not {"method", "budget", "retention", "accuracy"} <= set(df.columns):
        return []
    df = df[df["method"].notna() & (df["method"] != "none")]

    def clean(b):
        return str(b).rstrip("†‡ ")

    def share(b):
        try:
            return float(clean(b).split("%")[0])
        except ValueError:
            return -1.0

    order = sorted({clean(b) for b in df["budget"] if clean(b) != "-"}, key=share, reverse=True)
    lines = ["## Method retention at the default budgets (`make eval`)", "",
             f"Accuracy / accuracy without reduction (%) on the first 200 test questions, from `{csv_path.name}` "
             "(results/tables; regenerate with `make eval`); `random`: the mean of its seeds; † the method reaches "
             "no setting at that budget (the table's footnote).", "",
             "| method | no budget | " + " | ".join(order) + " |", "|---|---|" + "---|" * len(order)]
    for m, g in df.groupby("method", sort=True):
        cells = {}
        for b, r in zip(g["budget"], g["retention"]):
            try:
                cells[clean(b)] = f"{100 * float(r):.1f}" + ("†" if str(b).endswith("†") else "")
            except ValueError:
                cells[clean(b)] = "-"
        lines.append(f"| {m} | {cells.get('-', '')} | " + " | ".join(cells.get(b, "") for b in order) + " |")
    return lines + [""]


def write_card(model_dir: Path, res: dict) -> Path:
    """Write the model card `README.md` of `model_dir` from its train log/info and `res`."""
    import csv

    model_dir = Path(model_dir)
    info = json.loads((model_dir / "train_info.json").read_text()) if (model_dir / "train_info.json").exists() else {}
    cfg = json.loads((model_dir / "config.json").read_text())
    vc, tc = cfg["vision_config"], cfg["text_config"]
    curve = []
    if (model_dir / "train_log.csv").exists():
        with open(model_dir / "train_log.csv") as f:
            for row in csv.DictReader(f):
                if row.get("val_acc"):
                    curve.append(row)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file() and p.name != "README.md")
    modes = res.get("modes", {})

    def acc(m):
        return f"{100 * modes[m]['accuracy']:.1f}" if m in modes else "n/a"

    args = info.get("args", {})
    steps2 = info.get("steps2_done", args.get("steps2"))
    extra = recipe_flags(args, steps2)
    lines = [
        "# tiny-llava: a small LLaVA trained from scratch on `shapes`",
        "",
        "The default model of the harness (`model=tiny`). A real `LlavaForConditionalGeneration`",
        "(CLIP-style vision tower -> 2-layer GELU projector -> Llama-style decoder) with its own",
        "byte-level BPE tokenizer and a `LlavaProcessor` (`CLIPImageProcessorPil`), trained on CPU from",
        "random initialisation on the built-in `shapes` benchmark. Load it like any checkpoint:",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "model = AutoModelForImageTextToText.from_pretrained('harness/assets/tiny-llava')",
        "processor = AutoProcessor.from_pretrained('harness/assets/tiny-llava')",
        "```",
        "",
        "## Config",
        "",
        f"* vision tower (CLIP): image {vc['image_size']}px, patch {vc['patch_size']} -> "
        f"{(vc['image_size'] // vc['patch_size']) ** 2} patches (+CLS), hidden {vc['hidden_size']}, "
        f"{vc['num_hidden_layers']} layers, {vc['num_attention_heads']} heads, MLP {vc['intermediate_size']}",
        f"* LLaVA conventions: `vision_feature_layer={cfg['vision_feature_layer']}`, "
        f"`vision_feature_select_strategy=\"{cfg['vision_feature_select_strategy']}\"` (CLS dropped) -> "
        f"{cfg.get('image_seq_length')} visual tokens per image",
        f"* language model (Llama): hidden {tc['hidden_size']}, {tc['num_hidden_layers']} layers, "
        f"{tc['num_attention_heads']} heads ({tc['num_key_value_heads']} KV heads), MLP {tc['intermediate_size']}, "
        f"vocab {tc['vocab_size']}",
        f"* parameters: {info.get('params', 0) / 1e6:.2f} M; weights dtype {cfg.get('dtype', cfg.get('torch_dtype'))}; "
        f"folder size {size / 1e6:.1f} MB",
        "* prompt: `USER: <image>\\n{question} ASSISTANT:` (the processor's chat template), answer + `</s>`",
        "",
        "## Recipe",
        "",
        "Two stages, as in LLaVA (see `harness/tiny_model/train.py`), on **full** images of varied sizes: "
        "every step draws its scenes on one canvas, the benchmark's 192x192 (25 % of the tower's steps, 15 % of the decoder's), otherwise "
        "4x4 cells of 32-64 x 32-64 px (128-256 px per side, aspect ratios up to 2:1) with the tower's "
        "position embeddings interpolated -- dynamic resolution, as Qwen2-VL and LLaVA-NeXT train. A cell's "
        "tokens sit at different sequence positions from step to step, so the decoder cannot find a cell by "
        "its position id and reads where a token is from the token itself. No training sequence is made by "
        "dropping, merging, permuting or masking visual tokens, and no loss says where to attend.",
        "",
        f"1. **Vision tower** ({args.get('steps1')} steps, batch {args.get('batch1')}, AdamW lr {args.get('lr1')}, "
        "cosine): a dense objective on the feature layer (-2): every patch an object covers (at least 26 of "
        "its pixels) classifies that object (kind / colour / shape / letter) and every patch the row and "
        "column of its grid cell, with linear heads discarded afterwards.",
        f"2. **Projector + language model** ({steps2} steps, {args.get('images2')} images x "
        f"{args.get('questions2')} questions per step, AdamW lr {args.get('lr2')}), tower frozen: "
        "next-token loss on the answer tokens of the exact evaluation prompt, plus objectives that teach "
        "content and grounding, never a fixed place to look:",
        f"   * *projector init* ({args.get('proj_init2')}): the tower features' per-dimension mean and "
        "spread are folded into the first projector layer and the second is scaled so visual tokens enter "
        "the decoder at the scale of the text embeddings;",
        f"   * *dense answer words* (weight {args.get('dense_weight2')}) at every covered visual position: the "
        f"residual stream entering decoder layer {args.get('dense_layer2')}, read through the final norm and the "
        "LM head, names the object (colour + shape, or letter)"
        + (f"; entering layer {args.get('row_layer2')} a letter's tokens name its row number and entering layer "
           f"{args.get('col_layer2')} its column number;" if args.get("row_layer2", "-1") != "-1" else ";"),
        f"   * *shared code* (weight {args.get('code_weight2')}, entering layer {args.get('code_layer2')}): every "
        "visual token names its own cell (row, column) and object, and the answer position names what its "
        "question asks about, through the same linear heads (discarded afterwards);",
        f"   * *grounding* (weight {args.get('ground_weight2')}): at the answer position {args.get('ground_heads2')} "
        f"heads of layer {args.get('ground_layer2')} spread their attention over all tokens of the asked object, "
        "each object weighted equally (count questions: "
        + (f"heads {args.get('count_head2')}-{int(args.get('count_head2', 0)) + int(args.get('ground_heads2', 1)) - 1}, "
           if args.get("count_head2", "-1") != "-1" else "")
        + "the counted objects and BOS as a sink weighted like one more object, so the mass on them is n/(n+1)) "
        "-- wherever the object lies on that step's canvas, as referring-expression data grounds a real VLM; "
        "no token position is ever singled out;",
        f"   * *read-out* (weight {args.get('readout_weight2')}): the residual after layer "
        f"{args.get('readout_layer2')} predicts the first answer token;",
        f"   * *scene curriculum*: sparse scenes first, the benchmark's density after {args.get('curriculum2')} steps.",
        "",
        "   The image prefix of the prompt is question-independent, so its KV cache is computed once per image "
        "and shared by its questions. LR: warm-up, constant, then inverse-square-root decay after step "
        f"{args.get('decay_from2')} -- it does not depend on the total, so the checkpoint after N steps "
        "equals a run with `--steps2 N`. Every answer word is one token (BPE vocabulary trained on the "
        "question/answer text).",
        "",
        f"Data: `shapes` train split, generated on the fly, data seed {info.get('seed', 0)} "
        f"(model seed = data seed). Deterministic: fixed step counts, seeded data order, "
        f"`torch.use_deterministic_algorithms(True)`, {args.get('threads')} torch thread(s).",
        f"Training wall time: {info.get('train_wall_s', 0) / 60:.1f} min on the shared 2-core CPU "
        f"(stage 1: {info.get('stage1_s', 0) / 60:.1f} min).",
        *([f"Note: {info['note']}."] if info.get("note") else []),
        "",
        "## Scores (`shapes` " + f"{res.get('split')} split, n={res.get('n')}, exact match)",
        "",
        "| setting | accuracy (%) |",
        "|---|---|",
        f"| no reduction | {acc('none')} |",
        f"| blank image (mid-gray) | {acc('blank')} |",
        f"| blank image (black) | {acc('black')} |",
        f"| random 10 % of visual tokens kept | {acc('random10')} |",
        f"| best answer-prior baseline (most frequent answer per question type) | "
        f"{100 * res.get('prior_baseline', 0):.1f} |",
        "",
    ]
    if "none" in modes:
        lines += ["Per question type (no reduction): " + ", ".join(
            f"{k} {100 * v:.1f}" for k, v in modes["none"]["per_qtype"].items()), ""]
    if "none" in modes:
        weak = {k: v for k, v in modes["none"]["per_qtype"].items() if v < 0.7}
        if weak:
            lines += ["Limitations: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in weak.items())
                      + " -- below the other question types.", ""]
    if "random10" in modes:
        lines += ["Per question type (random 10 %): " + ", ".join(
            f"{k} {100 * v:.1f}" for k, v in modes["random10"]["per_qtype"].items()), ""]
    lines += property_lines(model_dir) + retention_lines(RETENTION_TABLE)
    lines += [
        "## Accuracy vs wall time (validation, during training)",
        "",
        "| stage | step | wall (s) | train loss | val accuracy (%) |",
        "|---|---|---|---|---|",
    ]
    for r in curve:
        lines.append(f"| {r['stage']} | {r['step']} | {r['wall_s']} | {r['loss']} | {100 * float(r['val_acc']):.1f} |")
    lines += [
        "",
        "The full log (every few steps) is `train_log.csv` (stage, step, wall seconds, loss, val accuracy).",
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python -m harness.tiny_model.train --out harness/assets/tiny-llava --seed {info.get('seed', 0)} "
        + " ".join(extra) + "   # = make tiny-model",
        "python -m harness.tiny_model.evaluate --model harness/assets/tiny-llava --split test --n 500 "
        "--modes none,blank,black,random10 --batch-size 25 --json /tmp/tiny_eval.json --card",
        "python -m harness.tiny_model.card --before 47d438b --threads 1 [--write]   # = make tiny-model-card: the properties",
        "```",
        "",
        "The evaluation prompts exactly as the harness does (chat template, processor, greedy "
        "`generate`, `max_new_tokens=5`; `--batch-size 25` left-pads batches of 25 for the none/blank/black "
        "modes, `--batch-size 1` is the harness's exact batch-1 path); `random10` really removes 90 % of the visual tokens "
        "(projected features subsampled with a per-document seeded generator, placeholder run shrunk, "
        "generation from `inputs_embeds`).",
        "",
    ]
    out = model_dir / "README.md"
    out.write_text("\n".join(lines))
    return out


