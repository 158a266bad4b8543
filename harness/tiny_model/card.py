"""The embedded model's properties, each measured against its threshold (`make tiny-model-card`).

    python -m harness.tiny_model.card [--model DIR] [--n 500] [--before REV] [--json OUT] [--markdown OUT]

The tiny model stands in for LLaVA in the default sweep, so it has to share the properties that make
token-reduction methods behave on a real VLM as they do: information spread over an object's tokens,
tokens that carry their own place (read by content, not by position id), a redundant image, and
competence on the benchmark. Every property below is measured on the `shapes` test split with the
model's own forward pass; visual tokens are the LLM-input ones (the projector's output), and a token
"covers" an object when at least `train.MIN_PIXELS` of the object's pixels lie in its patch.

Answers in the perturbation probes are greedy decodes (up to 3 tokens) of the sequence
``text before the image | kept visual tokens | question``; "renumbered" gives the kept tokens
consecutive position ids (what a method that removes tokens before the LLM does), "positions kept" their
original ids (the text after them keeps its ids too). Ratios compare with the same decoder on all tokens.
Competence is the harness path itself (processor, chat template, ``generate``).

``--before REV`` also measures the checkpoint committed at git revision REV (its files under
``harness/assets/tiny-llava``) on the generator version it was trained for, and prints both columns.
Exit status: 0 when every property holds for the measured model, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from harness.benchmarks import shapes as S
from harness.tiny_model.model_card import PROPERTIES, table, write_card

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava"
ASSET_PATH = "harness/assets/tiny-llava"
SINGLE_OBJECT_TYPES = ("colour", "shape", "letter", "position")
KEEP = 0.33
SEEDS = (0, 1, 2)

class BadInput(ValueError):
    pass


# --------------------------------------------------------------------------------------------------
# the model's own forward pass on chosen visual tokens
# --------------------------------------------------------------------------------------------------
class Prober:
    """Greedy answers of one model from a chosen subset / order / numbering of its visual tokens."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.tok = processor.tokenizer
        self.img_id = model.config.image_token_id
        self.emb = model.get_input_embeddings()

    def prompt(self, question: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True)

    @torch.no_grad()
    def encode(self, docs, batch: int = 50):
        """Per doc: (ids before the image, visual tokens [N, D], ids after the image)."""
        out = []
        for i in range(0, len(docs), batch):
            chunk = docs[i:i + batch]
            pv = self.processor(images=[d["image"] for d in chunk], text=["<image>"] * len(chunk),
                                return_tensors="pt")["pixel_values"]
            feats = self.model.model.get_image_features(pixel_values=pv).pooler_output
            for d, f in zip(chunk, feats):
                ids = self.processor(images=d["image"], text=self.prompt(d["question"]),
                                     return_tensors="pt")["input_ids"][0]
                pos = (ids == self.img_id).nonzero().flatten()
                out.append((ids[: int(pos[0])], f.reshape(-1, f.shape[-1]), ids[int(pos[-1]) + 1:]))
        return out

    @torch.no_grad()
    def answer(self, enc, keep=None, renumber: bool = True, max_new: int = 3) -> str:
        """Greedy answer with the visual tokens `keep` (indices in the order given; None = all in order)."""
        before, feats, after = enc
        n = feats.shape[0]
        keep = torch.arange(n) if keep is None else torch.as_tensor(keep, dtype=torch.long)
        nb = len(before)
        vis_pos = (nb + torch.arange(len(keep))) if renumber else (nb + keep)
        start = nb + (len(keep) if renumber else n)
        gen: list[int] = []
        for _ in range(max_new):
            text = torch.cat([after, torch.tensor(gen, dtype=torch.long)])
            x = torch.cat([self.emb(before), feats[keep], self.emb(text)])[None]
            pos = torch.cat([torch.arange(nb), vis_pos, start + torch.arange(len(text))])[None]
            logits = self.model(inputs_embeds=x, position_ids=pos).logits[0, -1]
            t = int(logits.argmax())
            if t == self.tok.eos_token_id:
                break
            gen.append(t)
        return self.tok.decode(gen, skip_special_tokens=True)


def _acc(preds, docs) -> float:
    return float(np.mean([S.score(p, d["answer"]) for p, d in zip(preds, docs)])) if docs else float("nan")


# --------------------------------------------------------------------------------------------------
# the properties
# --------------------------------------------------------------------------------------------------
def object_patches(image, cell: int, patch: int = 16) -> np.ndarray:
    """Pixels of the object in `cell` per patch (row-major) of the 192x192 image."""
    m = S.object_mask(image, cell)
    g = m.shape[0] // patch
    return m.reshape(g, patch, g, patch).sum((1, 3)).ravel()


def _colour_of(image, cell: int) -> int | None:
    """The fill colour of the shape in `cell` (index in COLOUR_NAMES), read from its pixels."""
    a = np.asarray(image.convert("RGB")).reshape(-1, 3)
    m = S.object_mask(image, cell).ravel() > 0
    if not m.any():
        return None
    px = a[m].astype(np.int64)
    ref = np.asarray([S.COLOURS[c] for c in S.COLOUR_NAMES], np.int64)
    d = ((px[:, None, :] - ref[None]) ** 2).sum(-1)
    exact = (d == 0).sum(0)
    return int(exact.argmax()) if exact.max() > 0 else None


def colour_probe(train_pairs, test_pairs, seed: int = 0) -> float:
    """Accuracy of a linear (softmax) probe trained on one set of (token, colour) pairs and scored on
    every token of the other."""
    xtr = torch.stack([t for t, _ in train_pairs]).float()
    ytr = torch.tensor([c for _, c in train_pairs])
    xte = torch.stack([t for t, _ in test_pairs]).float()
    yte = torch.tensor([c for _, c in test_pairs])
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(xtr.shape[1], len(S.COLOUR_NAMES))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin((xtr - mu) / sd), ytr) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin((xte - mu) / sd).argmax(-1) == yte).float().mean())


def coloured_tokens(docs, encs, min_pixels: int):
    pairs = []
    for d, e in zip(docs, encs):
        for cell, c in enumerate(d["cells"]):
            if c["kind"] != "shape":
                continue
            col = _colour_of(d["image"], cell)
            if col is None:
                continue
            for p in np.nonzero(object_patches(d["image"], cell) >= min_pixels)[0]:
                pairs.append((e[1][int(p)], col))
    return pairs


def measure(model_dir, version: str, n: int, progress=print) -> dict:
    from harness.tiny_model.evaluate import evaluate, load
    from harness.tiny_model.train import MIN_PIXELS

    torch.manual_seed(0)
    model, processor = load(model_dir)
    docs = S.generate("test", n, version=version, with_cells=True)
    probe_docs = S.generate("val", min(200, n), version=version, with_cells=True)
    pr = Prober(model, processor)
    out: dict = {"model": str(model_dir), "generator_version": version, "n": n}

    # spread: patches per object
    cover = [int((object_patches(d["image"], cell) >= MIN_PIXELS).sum())
             for d in docs for cell, c in enumerate(d["cells"]) if c["kind"] != "empty"]
    out["patches_per_object"] = float(np.mean(cover))

    encs = pr.encode(docs)
    probe_encs = pr.encode(probe_docs)
    out["colour_probe_any_token"] = colour_probe(coloured_tokens(probe_docs, probe_encs, MIN_PIXELS),
                                                 coloured_tokens(docs, encs, MIN_PIXELS))
    # the same probe on every token the object touches at all (fringe tokens with a few of its pixels)
    out["colour_probe_touching"] = colour_probe(coloured_tokens(probe_docs, probe_encs, 1),
                                                coloured_tokens(docs, encs, 1))
    progress(f"  probe done ({model_dir})")

    full = [pr.answer(e) for e in encs]
    out["full_decoder_accuracy"] = _acc(full, docs)

    # spread: the asked object's most informative token removed (single-object questions)
    idx = [i for i, d in enumerate(docs) if d["qtype"] in SINGLE_OBJECT_TYPES]
    hits_full, hits_drop = [], []
    for i in idx:
        d = docs[i]
        cells = S.question_cells(d["cells"], d["qtype"], d["question"])
        w = object_patches(d["image"], cells[0])
        best = int(w.argmax())
        keep = [j for j in range(encs[i][1].shape[0]) if j != best]
        hits_full.append(S.score(full[i], d["answer"]))
        hits_drop.append(S.score(pr.answer(encs[i], keep), d["answer"]))
    out["drop_best_token_accuracy"] = float(np.mean(hits_drop))
    out["drop_best_token_retention"] = float(np.mean(hits_drop) / max(1e-9, np.mean(hits_full)))
    progress("  drop-best done")

    # content: permuted + renumbered; random 33 % renumbered vs kept
    perm_acc, r_ren, r_kept = [], [], []
    for s in SEEDS:
        pp, pr_ren, pr_kept = [], [], []
        for i, e in enumerate(encs):
            N = e[1].shape[0]
            rng = np.random.default_rng([s, i])
            pp.append(pr.answer(e, rng.permutation(N)))
            kept = np.sort(rng.choice(N, size=max(1, int(round(KEEP * N))), replace=False))
            pr_ren.append(pr.answer(e, kept, renumber=True))
            pr_kept.append(pr.answer(e, kept, renumber=False))
        perm_acc.append(_acc(pp, docs))
        r_ren.append(_acc(pr_ren, docs))
        r_kept.append(_acc(pr_kept, docs))
        progress(f"  seed {s}: permuted {perm_acc[-1]:.3f} random33 renumbered {r_ren[-1]:.3f} kept {r_kept[-1]:.3f}")
    out["permuted_accuracy"] = float(np.mean(perm_acc))
    out["permute_renumber_retention"] = out["permuted_accuracy"] / max(1e-9, out["full_decoder_accuracy"])
    out["random33_renumbered_accuracy"] = float(np.mean(r_ren))
    out["random33_kept_accuracy"] = float(np.mean(r_kept))
    out["random33_accuracy_by_seed"] = r_ren
    out["random33_renumbered_vs_kept"] = out["random33_renumbered_accuracy"] / max(1e-9, out["random33_kept_accuracy"])
    out["random33_retention"] = out["random33_renumbered_accuracy"] / max(1e-9, out["full_decoder_accuracy"])

    # redundancy: background tokens' nearest neighbour among the image's other background tokens
    cos = []
    for d, e in zip(docs, encs):
        a = np.asarray(d["image"].convert("RGB"))
        g = a.shape[0] // 16
        fg = (a != np.asarray(S.BACKGROUND, a.dtype)).any(-1).reshape(g, 16, g, 16).sum((1, 3)).ravel()
        bg = np.nonzero(fg == 0)[0]
        if len(bg) < 2:
            continue
        t = torch.nn.functional.normalize(e[1][torch.as_tensor(bg)].float(), dim=-1)
        sim = t @ t.T
        sim.fill_diagonal_(-2.0)
        cos.extend(sim.max(1).values.tolist())
    out["background_nn_cosine"] = float(np.mean(cos))

    # competence (the harness path: processor, chat template, generate)
    res = {m: evaluate(model, processor, docs, mode=m, batch_size=25) for m in ("none", "blank")}
    out["accuracy"] = res["none"]["accuracy"]
    out["per_type"] = res["none"]["per_qtype"]
    out["min_type_accuracy"] = min(out["per_type"].values())
    out["blank_accuracy"] = res["blank"]["accuracy"]
    out["prior_accuracy"] = S.prior_baseline(docs)
    out["prior_over_accuracy"] = out["prior_accuracy"] / max(1e-9, out["accuracy"])
    out["blank_over_accuracy"] = out["blank_accuracy"] / max(1e-9, out["accuracy"])
    per_type = defaultdict(list)
    for p, d in zip(full, docs):
        per_type[d["qtype"]].append(S.score(p, d["answer"]))
    out["per_type_decoder"] = {k: float(np.mean(v)) for k, v in sorted(per_type.items())}
    return out


def checkout_model(rev: str, dest: Path) -> Path:
    """The tiny-model files committed at git revision `rev`, written under `dest`."""
    root = Path(__file__).resolve().parents[2]
    try:
        names = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", f"{rev}:{ASSET_PATH}"],
                               check=True, capture_output=True, text=True).stdout.split()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise BadInput(f"--before: no {ASSET_PATH} at git revision {rev!r} "
                       f"({(getattr(e, 'stderr', '') or str(e)).strip().splitlines()[0]})") from None
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        blob = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{ASSET_PATH}/{name}"], check=True,
                              capture_output=True).stdout
        (dest / name).write_bytes(blob)
    return dest


def generator_of(model_dir: Path) -> str:
    """The shapes generator version a checkpoint was trained on (train_info.json; 1.0 before it was recorded)."""
    try:
        info = json.loads((Path(model_dir) / "train_info.json").read_text())
    except (OSError, ValueError):
        return S.GENERATOR_VERSION
    return str(info.get("generator_version", "1.0"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=500, help="test-split documents (the full split: 500)")
    ap.add_argument("--before", default=None, help="git revision of an earlier checkpoint to measure beside it")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="write the property table here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true",
                    help="store the measurements as properties.json in --model and re-render its model card "
                         "(README.md, with the scores.json of `make tiny-model`)")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: re-render the model card of --model from its stored properties.json and "
                         "scores.json (and the committed `make eval` table's retentions)")
    args = ap.parse_args(argv)
    if args.render:
        try:
            scores = json.loads((args.model / "scores.json").read_text())
            json.loads((args.model / "properties.json").read_text())["after"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --render: {args.model} has no readable scores.json / properties.json ({e})", file=sys.stderr)
            return 2
        print(f"model card: {write_card(args.model, scores)}")
        return 0
    try:
        if not 1 <= args.n <= S.SPLIT_SIZES["test"]:
            raise BadInput(f"--n: {args.n} is outside 1..{S.SPLIT_SIZES['test']}")
        if not (args.model / "config.json").is_file():
            raise BadInput(f"--model: {args.model} holds no config.json")
        for p in (args.json, args.markdown):
            if p is not None and not p.parent.is_dir():
                raise BadInput(f"--json/--markdown: folder {p.parent} does not exist")
        torch.set_num_threads(args.threads)
        before = None
        with tempfile.TemporaryDirectory() as tmp:
            if args.before:
                old = checkout_model(args.before, Path(tmp) / "before")
                print(f"before: {args.before} (generator {generator_of(old)})", flush=True)
                before = measure(old, generator_of(old), args.n)
        after = measure(args.model, generator_of(args.model), args.n)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = table(after, before)
    print("\n".join(lines))
    print(f"per question type (harness path): " + ", ".join(f"{k} {v:.3f}" for k, v in after["per_type"].items()))
    if args.json:
        args.json.write_text(json.dumps({"after": after, "before": before}, indent=2, sort_keys=True))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.write:
        (args.model / "properties.json").write_text(
            json.dumps({"after": after, "before": before}, indent=2, sort_keys=True) + "\n")
        try:
            scores = json.loads((args.model / "scores.json").read_text())
        except (OSError, ValueError):
            scores = {}
        print(f"model card: {write_card(args.model, scores)}")
    held = all(ok(after[k]) for k, _, _, ok in PROPERTIES)
    print("all properties hold" if held else "some properties do not hold", flush=True)
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
