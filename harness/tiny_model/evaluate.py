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
        from harness.tiny_model.model_card import write_card

        print(f"model card: {write_card(args.model, res)}")
    return res


if __name__ == "__main__":
    main()
