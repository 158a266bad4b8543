"""Standalone evaluator of the tiny LLaVA on the `shapes` benchmark.

    python -m harness.tiny_model.evaluate [--model DIR] [--split test] [--n 500] \
        [--modes none,blank,black,random10] [--json OUT.json]

Modes:
* ``none``     -- the full model, prompted exactly as the harness does it (chat template,
  processor, greedy ``generate`` with ``max_new_tokens=5``, batch 1);
* ``blank``    -- every image replaced by a mid-gray image (``black``: an all-black one);
* ``randomK``  -- visual tokens really dropped: the projected image features from
  ``model.model.get_image_features`` are subsampled to a random K % (seeded per document), the run of
  ``<image>`` placeholders is shrunk to the kept count, and generation starts from
  ``inputs_embeds``. ``random10`` keeps 10 % (14 of 144 tokens).

Also prints the best answer-prior baseline (always answering the most frequent answer of each
question type, fitted on the evaluated split itself).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.benchmarks import shapes as S

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava"


def load(model_dir=DEFAULT_MODEL):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return model, processor


def prompt(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


@torch.no_grad()
def answer(model, processor, image, question: str, max_new_tokens: int = 5) -> str:
    inputs = processor(images=image, text=prompt(processor, question), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def answer_dropped(model, processor, image, question: str, keep: float, rng: np.random.Generator,
                   max_new_tokens: int = 5) -> str:
    """Answer with only a random `keep` fraction of the visual tokens (really removed)."""
    inputs = processor(images=image, text=prompt(processor, question), return_tensors="pt")
    ids = inputs["input_ids"][0]
    img_id = model.config.image_token_id
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]  # (N, D)
    n = feats.shape[0]
    k = max(1, int(round(keep * n)))
    kept = np.sort(rng.choice(n, size=k, replace=False))
    pos = (ids == img_id).nonzero().flatten()
    assert len(pos) == n
    keep_mask = torch.ones_like(ids, dtype=torch.bool)
    keep_mask[pos[k:]] = False  # shrink the placeholder run to k tokens
    new_ids = ids[keep_mask]
    emb = model.get_input_embeddings()(new_ids[None]).clone()
    new_pos = (new_ids == img_id).nonzero().flatten()
    emb[0, new_pos] = feats[torch.as_tensor(kept)].to(emb.dtype)
    am = torch.ones(1, emb.shape[1], dtype=torch.long)
    out = model.generate(inputs_embeds=emb, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False)
    if out.shape[1] > max_new_tokens:  # some versions prepend the prompt ids
        out = out[:, -max_new_tokens:]
    return processor.tokenizer.decode(out[0], skip_special_tokens=True)


@torch.no_grad()
def answer_batch(model, processor, images, questions, max_new_tokens: int = 5) -> list[str]:
    """Batched (left-padded) version of `answer`: same prompts, greedy decoding."""
    inputs = processor(images=list(images), text=[prompt(processor, q) for q in questions], return_tensors="pt",
                       padding=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, processor, docs, mode: str = "none", seed: int = 0, progress: bool = False,
             batch_size: int = 1) -> dict:
    """Accuracy (overall and per question type) of `model` on `docs` under `mode`."""
    from tqdm import tqdm

    hits, per = [], defaultdict(list)
    gray = Image.new("RGB", (S.IMAGE_SIZE, S.IMAGE_SIZE), (128, 128, 128))
    black = Image.new("RGB", (S.IMAGE_SIZE, S.IMAGE_SIZE), (0, 0, 0))
    preds = []
    batched = {}
    if batch_size > 1 and mode in ("none", "blank", "black"):
        for j in range(0, len(docs), batch_size):
            chunk = docs[j:j + batch_size]
            imgs = [d["image"] if mode == "none" else (gray if mode == "blank" else black) for d in chunk]
            for k, p in enumerate(answer_batch(model, processor, imgs, [d["question"] for d in chunk])):
                batched[j + k] = p
    for i, d in enumerate(tqdm(docs, desc=mode, disable=not progress, mininterval=5)):
        if i in batched:
            p = batched[i]
        elif mode == "none":
            p = answer(model, processor, d["image"], d["question"])
        elif mode == "blank":
            p = answer(model, processor, gray, d["question"])
        elif mode == "black":
            p = answer(model, processor, black, d["question"])
        elif mode.startswith("random"):
            keep = float(mode[len("random"):]) / 100.0
            rng = np.random.default_rng([seed, i])
            p = answer_dropped(model, processor, d["image"], d["question"], keep, rng)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        s = S.score(p, d["answer"])
        hits.append(s)
        per[d["qtype"]].append(s)
        preds.append(p)
    return {
        "mode": mode,
        "n": len(docs),
        "accuracy": float(np.mean(hits)) if hits else 0.0,
        "per_qtype": {k: float(np.mean(v)) for k, v in sorted(per.items())},
        "predictions": preds,
    }


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
    from harness.tiny_model.card import table

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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Evaluate the tiny LLaVA on shapes")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--split", default="test", choices=S.SPLITS)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token subsets")
    ap.add_argument("--modes", default="none,blank,black,random10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1,
                    help="batch (left padding) for the none/blank/black modes; 1 = exactly the harness path")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--card", action="store_true", help="(re)write the model card README.md in --model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    docs = S.generate(args.split, args.n, seed=args.data_seed)
    res = {
        "model": str(args.model), "split": args.split, "n": len(docs), "data_seed": args.data_seed,
        "prior_baseline": S.prior_baseline(docs), "prior": S.answer_prior(docs), "modes": {},
    }
    print(f"best answer-prior baseline ({args.split}, n={len(docs)}): {res['prior_baseline']:.4f}", flush=True)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        t = time.time()
        r = evaluate(model, processor, docs, mode, seed=args.seed, batch_size=args.batch_size)
        r["seconds"] = round(time.time() - t, 1)
        res["modes"][mode] = r
        per = " ".join(f"{k}={v:.3f}" for k, v in r["per_qtype"].items())
        print(f"{mode:>9}: accuracy {r['accuracy']:.4f} ({per}) [{r['seconds']}s]", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    if args.card:
        slim = {**res, "modes": {m: {k: v for k, v in r.items() if k != "predictions"} for m, r in res["modes"].items()}}
        (args.model / "scores.json").write_text(json.dumps(slim, indent=2, sort_keys=True) + "\n")
        print(f"model card: {write_card(args.model, res)}")
    return res


if __name__ == "__main__":
    main()
