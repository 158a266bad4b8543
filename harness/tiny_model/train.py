"""Train the embedded tiny LLaVA (`model=tiny`) from scratch on the `shapes` benchmark, on CPU.

Recipe (LLaVA-style two stages, sized for a 2-core CPU), on **full** images of varied sizes:

* Canvases. Every step draws its scenes on one canvas: the benchmark's 192x192 (25 % of the
  tower's steps, 15 % of the decoder's) or 4x4 cells of 32-64 x 32-64 pixels (128-256 px per side, aspect ratios up to 2:1), the
  vision tower's position embeddings interpolated to the patch grid -- dynamic resolution, as Qwen2-VL
  and LLaVA-NeXT train. A grid cell's tokens therefore sit at different sequence positions from step
  to step, so the decoder cannot find a cell by its position id; it has to read where a token is from
  the token itself, as real VLMs do.
* Stage 1 -- vision tower. A dense objective on the feature layer (-2, the layer LLaVA feeds to the
  projector): *every* patch an object covers (at least 26 of its pixels) classifies that object (kind,
  colour, shape, letter) and every patch the row and column of its grid cell, with small linear heads
  thrown away afterwards. The object is named by all of its tokens, and each token carries its place.
* Stage 2 -- projector + language model, tower frozen: next-token loss on the answer tokens of the exact
  evaluation prompt ``"USER: <image>\\n{question} ASSISTANT: {answer}</s>"``, plus auxiliary objectives
  that teach content and grounding, never a fixed place to look:
  - *dense words* (`dense_word_loss`): the residual stream of every token an object covers, read through
    the final norm and the LM head, names the object (colour + shape, or letter) (optionally, with
    `--row-layer2` / `--col-layer2`, a letter's tokens its row and column number a few layers later: off in
    the committed recipe, where the answer then mixed up the two numbers);
  - *shared code* (`code_loss`): entering one layer, every visual token names its own cell and object and
    the answer position names what its question asks about, through the same linear heads;
  - *grounding* (`grounding_loss`): at the answer position two heads spread their attention over all
    tokens of the asked object (count: two other heads, over the counted objects and BOS as a sink) --
    wherever the object lies on this step's canvas, as referring-expression data grounds a real VLM;
  - *read-out*: the residual after a middle layer already predicts the first answer token;
  - a *scene curriculum*: sparse scenes first, the benchmark's density after `--curriculum2` steps.
  The image prefix of the prompt does not depend on the question, so it is run once per image and its KV
  cache is shared by K questions about that image.

No training sequence is ever made by dropping, merging, permuting or masking visual tokens: whatever
the model does under a reduction method comes from its representation, not from rehearsal.

Everything is deterministic by ``--seed`` (fixed step counts, seeded data and canvases, deterministic
torch algorithms, a fixed thread count); progress goes to a tqdm bar and ``train_log.csv`` (stage, step,
wall seconds, loss, val accuracy). Run ``python -m harness.tiny_model.train --help``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.benchmarks import shapes as S

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONFIGS = {
    # the committed model
    "default": dict(image_size=192, patch_size=16, vision_hidden=128, vision_layers=4, vision_heads=4,
                    hidden=128, intermediate=384, layers=8, heads=4, vocab=448),
    # for the smoke test
    "smoke": dict(image_size=192, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
                  hidden=32, intermediate=64, layers=2, heads=2, vocab=300),
}


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
def tokenizer_corpus(seed: int, n: int = 3000) -> list[str]:
    """Question/answer text of the shapes train split (plus the prompt scaffolding)."""
    rng = random.Random(f"tokenizer-corpus:{seed}")
    lines = ["USER: ASSISTANT:", "USER: <image>\n ASSISTANT:"]
    for _ in range(n):
        cells = S.make_scene(rng)
        for qt, q, a in S.scene_questions(cells, rng, 5):
            lines.append(f"USER: \n{q} ASSISTANT: {a}")
    lines += [" ".join(S.COLOUR_NAMES), " ".join(S.SHAPES), " ".join(c.lower() for c in S.LETTERS),
              " ".join(S.LETTERS), "0 1 2 3 4 5 6 7 8 9"]
    # every answer word as one token (with its leading space): a single-token answer is one
    # classification at the answer position instead of two dependent predictions
    answers = [*S.COLOUR_NAMES, *S.SHAPES, *(c.lower() for c in S.LETTERS), *map(str, range(10))]
    lines += [f"ASSISTANT: {a}" for a in answers] * 40
    return lines


def build(cfg: dict, seed: int):
    """A fresh (model, processor) for `cfg`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from harness.models.tiny import CHAT_TEMPLATE, make_tokenizer

    tok = make_tokenizer(tokenizer_corpus(seed), vocab_size=cfg["vocab"])
    image_token_id = tok.convert_tokens_to_ids("<image>")
    n_img = (cfg["image_size"] // cfg["patch_size"]) ** 2
    vcfg = CLIPVisionConfig(
        hidden_size=cfg["vision_hidden"], intermediate_size=cfg["vision_hidden"] * 4,
        num_hidden_layers=cfg["vision_layers"], num_attention_heads=cfg["vision_heads"],
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], projection_dim=cfg["vision_hidden"],
    )
    tcfg = LlamaConfig(
        hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"], vocab_size=len(tok),
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    lcfg = LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_index=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=n_img,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(lcfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": cfg["image_size"]},
        crop_size={"height": cfg["image_size"], "width": cfg["image_size"]},
    )
    from harness.models.tiny import CHAT_TEMPLATE  # noqa: F811

    processor = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=cfg["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


@torch.no_grad()
def init_projector(model, feats: torch.Tensor, seed: int) -> None:
    """Data-dependent projector initialisation (stage 2 start).

    The stage-1 tower's feature-layer activations have a large common component (norm ~40) and
    the default projector maps them to ~100x the norm of the text embeddings, so the LM's residual
    stream is dominated by a patch-independent direction and the per-patch content a read-out head
    copies is drowned by the final norm (a probe finds the asked cell's colour at ~99 % in the
    visual token and at ~20 % at the answer position after the head that attends to it). Fold a
    per-dimension standardisation of the features into ``linear_1`` (unit-variance pre-activations)
    and scale ``linear_2`` so visual tokens enter the LM at the scale of the text embeddings.
    """
    proj = model.model.multi_modal_projector
    f = feats.reshape(-1, feats.shape[-1]).float()
    mu, sd = f.mean(0), f.std(0) + 1e-5
    g = torch.Generator().manual_seed(seed)
    l1, l2 = proj.linear_1, proj.linear_2
    w1 = torch.randn(l1.out_features, l1.in_features, generator=g) / math.sqrt(l1.in_features) / sd
    l1.weight.copy_(w1)
    l1.bias.copy_(-w1 @ mu)
    emb_std = float(model.model.language_model.get_input_embeddings().weight.std())
    gelu_rms = math.sqrt(0.425)  # E[gelu(z)^2] for z ~ N(0, 1)
    l2.weight.copy_(torch.randn(l2.out_features, l2.in_features, generator=g)
                    * emb_std / (gelu_rms * math.sqrt(l2.in_features)))
    l2.bias.zero_()


def pixels(images) -> torch.Tensor:
    """CLIP normalisation of same-sized RGB PIL images (identical to the processor on 192x192 images)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def prompt_text(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


class PromptCodec:
    """Token ids of the prompt pieces: the question-independent prefix (its image-token run as long as
    the canvas has patches) and the question suffix after the last image token."""

    def __init__(self, processor):
        self.tok = processor.tokenizer
        self.processor = processor
        self.image_token_id = self.tok.convert_tokens_to_ids("<image>")
        full = self.encode_prompt("What shape is in row 1, column 1?")
        last = max(i for i, t in enumerate(full) if t == self.image_token_id)
        self._head = full[: last + 1]
        assert self._head.count(self.image_token_id) == 1, "one image token per image expected"
        self._cache: dict[str, list[int]] = {}

    def encode_prompt(self, question: str) -> list[int]:
        return self.tok(prompt_text(self.processor, question))["input_ids"]

    def prefix(self, n_img: int) -> list[int]:
        """The prompt up to and including the image-token run of `n_img` tokens."""
        i = self._head.index(self.image_token_id)
        return self._head[:i] + [self.image_token_id] * n_img

    def suffix(self, question: str) -> list[int]:
        if question not in self._cache:
            ids = self.encode_prompt(question)
            assert ids[: len(self._head)] == self._head
            self._cache[question] = ids[len(self._head):]
        return self._cache[question]

    def answer(self, answer: str) -> list[int]:
        return self.tok(" " + answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]


# --------------------------------------------------------------------------------------------------
# data: canvases and per-patch labels
# --------------------------------------------------------------------------------------------------
KIND_IDS = {"empty": 0, "shape": 1, "letter": 2}
CELL_SIZES = (32, 40, 48, 56, 64)  # cell width / height options in pixels (4 cells per side)
# share of steps on the benchmark's own 192x192 canvas, per stage (the decoder sees it less often, so a
# cell's sequence positions are rarely the benchmark's)
P_BENCH_CANVAS = {"vision": 0.25, "llm": 0.15}
MIN_PIXELS = 26  # a patch "is covered" by an object with at least this many of its pixels (~10 %)


def canvas(seed: int, stage: str, step: int) -> tuple[int, int]:
    """The (cell_w, cell_h) of a training step: 48x48 (the benchmark) with P_BENCH_CANVAS[stage], else each
    side drawn from CELL_SIZES -- image sides of 128-256 px, aspect ratios up to 2:1."""
    rng = random.Random(f"canvas:{seed}:{stage}:{step}")
    if rng.random() < P_BENCH_CANVAS[stage]:
        return S.CELL, S.CELL
    return rng.choice(CELL_SIZES), rng.choice(CELL_SIZES)


def patch_labels(cells, image, cell_w: int = S.CELL, cell_h: int = S.CELL, patch: int = 16) -> torch.Tensor:
    """Per-patch labels (N, 7) of a rendered scene, patches row-major: kind, colour(+1), shape(+1),
    letter(+1) (0 = none) of the object covering the patch (the cell whose object has the most of the
    patch's pixels, at least MIN_PIXELS; else 'empty' -- an object drawn small on a small canvas may cover
    no patch so), the row and column of the grid cell under the
    patch centre, and the index of the covering cell (-1 = none)."""
    a = np.asarray(image.convert("RGB"))
    h, w = a.shape[:2]
    gh, gw = h // patch, w // patch
    fg = (a[: gh * patch, : gw * patch] != np.asarray(S.BACKGROUND, a.dtype)).any(-1)
    rows = np.minimum(np.arange(gh * patch) // cell_h, S.GRID - 1)
    cols = np.minimum(np.arange(gw * patch) // cell_w, S.GRID - 1)
    owner_px = np.where(fg, rows[:, None] * S.GRID + cols[None, :], S.GRID * S.GRID)
    blocks = owner_px.reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    counts = np.stack([(blocks == k).sum(1) for k in range(S.GRID * S.GRID)], 1)  # N, 16
    owner = counts.argmax(1)
    covered = counts.max(1) >= MIN_PIXELS
    centre_y = np.arange(gh) * patch + patch // 2
    centre_x = np.arange(gw) * patch + patch // 2
    prow = np.minimum(centre_y // cell_h, S.GRID - 1)
    pcol = np.minimum(centre_x // cell_w, S.GRID - 1)
    lab = np.zeros((gh * gw, 7), dtype=np.int64)
    lab[:, 4] = np.repeat(prow, gw)
    lab[:, 5] = np.tile(pcol, gh)
    lab[:, 6] = -1
    for n in np.nonzero(covered)[0]:
        c = cells[int(owner[n])]
        if c["kind"] == "empty":
            continue
        lab[n, 0] = KIND_IDS[c["kind"]]
        if c["kind"] == "shape":
            lab[n, 1] = S.COLOUR_NAMES.index(c["colour"]) + 1
            lab[n, 2] = S.SHAPES.index(c["shape"]) + 1
        else:
            lab[n, 3] = S.LETTERS.index(c["letter"]) + 1
        lab[n, 6] = int(owner[n])
    return torch.from_numpy(lab)


def train_scene(seed: int, index: int, p_empty: float = S.P_EMPTY):
    rng = S.doc_rng(seed, "train", index)
    cells = S.make_scene(rng, p_empty=p_empty)
    return cells, rng


def curriculum_p_empty(step: int, steps: int) -> float:
    """Stage-2 curriculum over *scenes* (never over tokens): sparse scenes first (about 1-2 objects),
    linearly up to the benchmark's density by `steps`. With one object, "the shape in row 2, column 3" is
    the only coloured thing in the image; denser scenes then make the decoder tell cells apart."""
    if steps <= 0 or step >= steps:
        return S.P_EMPTY
    start = 0.9
    return start + (S.P_EMPTY - start) * step / steps


def cell_words(cell: dict, row: int, col: int, what: str) -> list[str]:
    """The answer words describing a grid cell for the dense objective `what`:
    'words' -> a shape's colour and shape, a letter's letter; 'row' / 'col' -> a letter's row / column
    number (1-based; the answer of the position questions); [] = no target."""
    if what == "words":
        if cell["kind"] == "shape":
            return [cell["colour"], cell["shape"]]
        return [cell["letter"].lower()] if cell["kind"] == "letter" else []
    if cell["kind"] != "letter":
        return []
    return [str((row if what == "row" else col) + 1)]


def dense_word_loss(model, hidden, scenes, labels, codec, img_start: int, what: str = "words"):
    """LM-side content objective (the decoder's counterpart of stage 1): at *every* visual position an
    object covers (`patch_labels`), the decoder's residual stream `hidden` (B, T, D) read through the
    final norm and the LM head predicts the object's answer words (several words share the probability
    equally). The words are then present at all of the object's tokens in the unembedding's own
    coordinates. It says what a token holds, never where the decoder should look."""
    lm = model.model.language_model
    rows, targets = [], []
    word_ids: dict[tuple, list[int]] = {}
    for b, (cells, lab) in enumerate(zip(scenes, labels)):
        for n in torch.nonzero(lab[:, 6] >= 0).flatten().tolist():
            owner = int(lab[n, 6])
            r, c = divmod(owner, S.GRID)
            key = (b, owner)
            if key not in word_ids:
                word_ids[key] = [codec.answer(w)[0] for w in cell_words(cells[owner], r, c, what)]
            if word_ids[key]:
                rows.append((b, img_start + n))
                targets.append(word_ids[key])
    if not rows:
        return None
    bi = torch.tensor([r[0] for r in rows])
    ti = torch.tensor([r[1] for r in rows])
    logp = torch.log_softmax(model.lm_head(lm.norm(hidden[bi, ti])), dim=-1)
    width = max(len(t) for t in targets)
    tid = torch.tensor([t + [t[0]] * (width - len(t)) for t in targets])
    tw = torch.tensor([[1.0 / len(t)] * len(t) + [0.0] * (width - len(t)) for t in targets])
    return -(logp.gather(1, tid) * tw).sum(1).mean()


# --------------------------------------------------------------------------------------------------
# evaluation (generate path, as the harness does it)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_docs(model, processor, docs, batch_size: int = 25, max_new_tokens: int = 5) -> float:
    model.eval()
    hits = 0.0
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        texts = [prompt_text(processor, d["question"]) for d in chunk]
        inputs = processor(images=[d["image"] for d in chunk], text=texts, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        preds = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(S.score(p, d["answer"]) for p, d in zip(preds, chunk))
    return hits / max(1, len(docs))


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def lr_rsqrt(step: int, peak: float, warmup: int, t0: int) -> float:
    """Warm-up, then constant until `t0`, then inverse-square-root decay.

    Depends on the step only (not on the total), so the checkpoint saved at step N of a long run is
    exactly what a run with `--steps2 N` produces.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * math.sqrt(t0 / max(step, t0))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def optimizer_step(opt, loss, params, run: float | None) -> tuple[float, float]:
    """One AdamW step with gradient clipping at 1.0; returns (this loss, its running mean)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    lv = float(loss.detach())
    return lv, (lv if run is None else 0.95 * run + 0.05 * lv)


class Logger:
    def __init__(self, path: Path | None, t0: float):
        self.path, self.t0 = path, t0
        if path is not None:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(["stage", "step", "wall_s", "loss", "val_acc"])

    def log(self, stage, step, loss, val_acc=""):
        if self.path is None:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([stage, step, f"{time.time() - self.t0:.1f}",
                                    f"{loss:.4f}" if loss == loss else "", val_acc if val_acc == "" else f"{val_acc:.4f}"])


def scene_batch(seed: int, start: int, n: int, cell_w: int, cell_h: int, p_empty: float = S.P_EMPTY):
    """`n` train scenes from index `start`, rendered on a `cell_w` x `cell_h`-cell canvas: (cells, rngs,
    images, per-patch labels)."""
    scenes, rngs, imgs, labs = [], [], [], []
    for i in range(n):
        cells, rng = train_scene(seed, start + i, p_empty)
        img = S.render(cells, cell_w, cell_h)
        scenes.append(cells)
        rngs.append(rng)
        imgs.append(img)
        labs.append(patch_labels(cells, img, cell_w, cell_h))
    return scenes, rngs, imgs, labs


def tower_features(model, pv: torch.Tensor) -> torch.Tensor:
    """Feature-layer patch tokens (B, N, d) of any canvas (position embeddings interpolated when it is
    not the tower's own size)."""
    vc = model.config.vision_config
    interp = tuple(pv.shape[-2:]) != (vc.image_size, vc.image_size)
    out = model.model.vision_tower(pv, output_hidden_states=True, interpolate_pos_encoding=interp)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def stage1(model, args, log: Logger, bar_disable: bool):
    from tqdm import tqdm

    vt = model.model.vision_tower
    d = model.config.vision_config.hidden_size
    heads = nn.ModuleList([nn.Linear(d, 3), nn.Linear(d, len(S.COLOUR_NAMES) + 1),
                           nn.Linear(d, len(S.SHAPES) + 1), nn.Linear(d, len(S.LETTERS) + 1),
                           nn.Linear(d, S.GRID), nn.Linear(d, S.GRID)])
    params = list(vt.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr1, weight_decay=0.01, betas=(0.9, 0.98))
    vt.train()
    bar = tqdm(range(args.steps1), desc="stage1 vision", disable=bar_disable, mininterval=5)
    run = None
    for step in bar:
        cw, ch = canvas(args.seed, "vision", step)
        _, _, imgs, labs = scene_batch(args.seed, 10_000_000 + step * args.batch1, args.batch1, cw, ch)
        lab = torch.stack(labs)  # B, N, 7
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps1, args.lr1, args.warmup1)
        h = tower_features(model, pixels(imgs))  # B, N, d
        loss = 0.0
        accs = []
        for k, head in enumerate(heads):
            y = lab[..., k].flatten()
            m = (y >= 0) if k in (0, 4, 5) else (y > 0)
            if m.any():
                logits = head(h).flatten(0, 1)[m]
                loss = loss + nn.functional.cross_entropy(logits, y[m])
                accs.append(float((logits.argmax(-1) == y[m]).float().mean()))
        lv, run = optimizer_step(opt, loss, params, run)
        bar.set_postfix(loss=f"{run:.3f}")
        if step % args.log_every == 0 or step == args.steps1 - 1:
            log.log("vision", step, lv)
            if bar_disable:
                acc_s = " ".join(f"{a:.2f}" for a in accs)
                print(f"[stage1] step {step} canvas {cw * S.GRID}x{ch * S.GRID} loss {lv:.4f} "
                      f"acc(kind,colour,shape,letter,row,col) {acc_s} ({time.time() - log.t0:.0f}s)", flush=True)
    vt.eval()
    return run


CODE_HEADS = {"row": S.GRID, "col": S.GRID, "letter": len(S.LETTERS) + 1, "colour": len(S.COLOUR_NAMES) + 1,
              "shape": len(S.SHAPES) + 1}
_LABEL_COLUMN = {"row": 4, "col": 5, "letter": 3, "colour": 1, "shape": 2}


def code_targets(qtype: str, question: str) -> dict[str, int]:
    """The shared-code targets of the answer position: what the question asks about
    (`shapes.question_target`) in the classes of CODE_HEADS (0 = none for the object heads)."""
    t = S.question_target(qtype, question)
    if "letter" in t:
        return {"letter": S.LETTERS.index(t["letter"]) + 1}
    if "colour" in t:
        return {"colour": S.COLOUR_NAMES.index(t["colour"]) + 1}
    if "shape" in t:
        return {"shape": S.SHAPES.index(t["shape"]) + 1}
    return t


def code_loss(heads, h_img, labels, h_query, queries):
    """The shared-code objective: entering one decoder layer, every visual token names its own grid cell
    (row, column) and the object it covers (letter / colour / shape), and the answer-predicting position
    names what its question asks about -- both through the *same* linear heads (discarded afterwards),
    so a visual token's content and the question's content share coordinates. It teaches what a token
    holds and what a question asks, never where to look."""
    loss = 0.0
    for name, head in heads.items():
        y = torch.stack(labels)[..., _LABEL_COLUMN[name]]  # B, N
        m = (y >= 0) if name in ("row", "col") else (y > 0)
        if m.any():
            loss = loss + nn.functional.cross_entropy(head(h_img[m]), y[m])
        rows = [(i, q[name]) for i, q in enumerate(queries) if name in q]
        if rows:
            idx = torch.tensor([r[0] for r in rows])
            loss = loss + nn.functional.cross_entropy(head(h_query[idx]), torch.tensor([r[1] for r in rows]))
    return loss


def grounding_targets(lab, cells: list[int], count: bool, img_start: int) -> dict[int, float]:
    """{prefix index: weight} of the grounding objective: every token an asked object covers, each object
    weighted equally and its weight shared evenly by its tokens; for a count question also BOS (index 0),
    weighted as one more object -- a sink, so the attention mass on the counted objects is n / (n + 1)
    for n of them, whatever their sizes. {} = no target."""
    out: dict[int, float] = {}
    groups = [torch.nonzero(lab[:, 6] == c).flatten().tolist() for c in cells]
    groups = [g for g in groups if g]
    n = len(groups) + (1 if count else 0)
    if n == 0:
        return out
    for g in groups:
        for t in g:
            out[img_start + int(t)] = 1.0 / (n * len(g))
    if count:
        out[0] = 1.0 / n
    return out


def grounding_loss(model, out_hidden, cache, layer: int, query_pos, targets, P: int, heads: int, first: int = 0):
    """Grounding supervision (as referring-expression data gives a real VLM): at the answer-predicting
    position, `heads` heads of decoder layer `layer` (from head `first`) spread their attention over *every* token
    of the object the question is about -- wherever the object lies on this step's canvas, so no position
    is ever singled out (cross-entropy with the distribution `grounding_targets` gives). `query_pos[i]` is
    the suffix index of sample i's answer position, `targets[i]` its {prefix index: weight}; samples
    without targets are skipped."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    dec = lm.layers[layer]
    attn = dec.self_attn
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return None
    idx = torch.tensor(keep)
    qp = torch.tensor([query_pos[i] for i in keep])
    x = dec.input_layernorm(out_hidden[layer][idx, qp])  # the layer's input at the answer positions (n, D)
    hd = attn.head_dim
    hs = slice(first, first + heads)
    q = attn.q_proj(x).view(len(keep), -1, hd)[:, hs]  # n, H', hd
    cos, sin = lm.rotary_emb(x[:, None], (P + qp)[:, None])
    q, _ = apply_rotary_pos_emb(q[:, :, None], q[:, :, None], cos, sin)  # n, H', 1, hd
    keys = cache.layers[layer].keys[idx, hs]  # n, H', T, hd  (GQA-free: one KV head per head)
    scores = (q @ keys.transpose(-1, -2)).squeeze(-2) * attn.scaling  # n, H', T
    T = keys.shape[-2]
    scores = scores.masked_fill((torch.arange(T)[None, :] > (P + qp)[:, None])[:, None], float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)
    tw = torch.zeros(len(keep), T)
    for j, i in enumerate(keep):
        idx_t, w_t = zip(*targets[i].items())
        tw[j, list(idx_t)] = torch.tensor(w_t)
    return -(logp.masked_fill(tw[:, None] == 0, 0.0) * tw[:, None]).sum(-1).mean()


def stage2(model, processor, args, log: Logger, val_docs, bar_disable: bool):
    from tqdm import tqdm
    from transformers import DynamicCache

    codec = PromptCodec(processor)
    base = model.model
    lm = base.language_model
    emb = lm.get_input_embeddings()
    for p in base.vision_tower.parameters():
        p.requires_grad_(False)
    base.vision_tower.eval()
    if args.proj_init2 == "standardize":
        _, _, imgs0, _ = scene_batch(args.seed, 20_000_000, 32, S.CELL, S.CELL)
        with torch.no_grad():
            init_projector(model, tower_features(model, pixels(imgs0)), args.seed)
    params = list(base.multi_modal_projector.parameters()) + list(lm.parameters()) + list(model.lm_head.parameters())
    code_heads = nn.ModuleDict({k: nn.Linear(model.config.text_config.hidden_size, n) for k, n in CODE_HEADS.items()})
    if args.code_layer2 >= 0:
        params += list(code_heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr2, weight_decay=0.01, betas=(0.9, 0.98))
    pad = processor.tokenizer.pad_token_id
    bar = tqdm(range(args.steps2), desc="stage2 llm", disable=bar_disable, mininterval=5)
    run = None
    for step in bar:
        model.train()
        base.vision_tower.eval()
        cw, ch = canvas(args.seed, "llm", step)
        scenes, rngs, imgs, labs = scene_batch(args.seed, step * args.images2, args.images2, cw, ch,
                                               curriculum_p_empty(step, args.curriculum2))
        qas = []
        for cells, rng in zip(scenes, rngs):
            qs = S.scene_questions(cells, rng, args.questions2)
            while len(qs) < args.questions2:  # rare: pad with repeats
                qs.append(qs[len(qs) % max(1, len(qs))])
            qas.append(qs)
        B, K = len(imgs), args.questions2
        with torch.no_grad():
            feats = tower_features(model, pixels(imgs))
        n_img = feats.shape[1]
        prefix = torch.tensor(codec.prefix(n_img))
        img_pos = prefix == codec.image_token_id
        img_start = int(img_pos.nonzero()[0])
        P = len(prefix)
        pre = emb(prefix)[None].expand(B, -1, -1).clone()
        pre[:, img_pos] = base.multi_modal_projector(feats)
        cache = DynamicCache(config=model.config.text_config)
        pout = lm(inputs_embeds=pre, past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(P)[None].expand(B, -1),
                  output_hidden_states=args.dense_weight2 > 0 or args.code_layer2 >= 0)
        dloss = None
        if args.dense_weight2 > 0:
            for what, layer in (("words", args.dense_layer2), ("row", args.row_layer2), ("col", args.col_layer2)):
                if layer < 0:
                    continue
                dl = dense_word_loss(model, pout.hidden_states[layer], scenes, labs, codec, img_start, what)
                if dl is not None:
                    dloss = dl if dloss is None else dloss + dl
        cache.batch_repeat_interleave(K)
        seqs, tgts, qpos, codes, gtargets, glayers = [], [], [], [], [], []
        for cells_i, lab_i, qs in zip(scenes, labs, qas):
            for qt, q, a in qs[:K]:
                sfx = codec.suffix(q)
                ans = codec.answer(a)
                seqs.append(sfx + ans)
                tgts.append([-100] * (len(sfx) - 1) + ans + [-100])
                qpos.append(len(sfx) - 1)
                codes.append(code_targets(qt, q))
                gtargets.append(grounding_targets(lab_i, S.question_cells(cells_i, qt, q), qt == "count", img_start))
                layer = (args.ground_layer2 if qt != "position" or args.row_layer2 < 0 else
                         (args.row_layer2 if q.startswith("Which row") else args.col_layer2))
                glayers.append((layer, args.count_head2 if qt == "count" and args.count_head2 >= 0 else 0))
        L = max(len(x) for x in seqs)
        ids = torch.full((B * K, L), pad, dtype=torch.long)
        tg = torch.full((B * K, L), -100, dtype=torch.long)
        for i, (x, t) in enumerate(zip(seqs, tgts)):
            ids[i, :len(x)] = torch.tensor(x)
            tg[i, :len(t)] = torch.tensor(t)
        out = lm(inputs_embeds=emb(ids), past_key_values=cache, use_cache=True,
                 position_ids=(P + torch.arange(L))[None].expand(B * K, -1),
                 output_hidden_states=(args.readout_layer2 >= 0 or args.code_layer2 >= 0
                                       or args.ground_weight2 > 0))
        logits = model.lm_head(out.last_hidden_state)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tg.flatten(), ignore_index=-100)
        if args.readout_layer2 >= 0:
            # deep supervision: the residual after this layer already predicts the first answer token
            qp_t = torch.tensor(qpos)
            hmid = out.hidden_states[args.readout_layer2 + 1][torch.arange(len(qpos)), qp_t]
            first = tg[torch.arange(len(qpos)), qp_t]
            loss = loss + args.readout_weight2 * nn.functional.cross_entropy(
                model.lm_head(lm.norm(hmid)), first, ignore_index=-100)
        if args.ground_weight2 > 0:
            for layer, first in sorted(set(glayers)):
                gl = grounding_loss(model, out.hidden_states, cache, layer, qpos,
                                    [t if lyr == (layer, first) else {} for t, lyr in zip(gtargets, glayers)], P,
                                    args.ground_heads2, first)
                if gl is not None:
                    loss = loss + args.ground_weight2 * gl
        if args.code_layer2 >= 0:
            h_img = pout.hidden_states[args.code_layer2][:, img_start:img_start + n_img]
            h_q = out.hidden_states[args.code_layer2][torch.arange(len(qpos)), torch.tensor(qpos)]
            loss = loss + args.code_weight2 * code_loss(code_heads, h_img, labs, h_q, codes)
        if dloss is not None:
            loss = loss + args.dense_weight2 * dloss
        for g in opt.param_groups:
            g["lr"] = lr_rsqrt(step, args.lr2, args.warmup2, args.decay_from2)
        lv, run = optimizer_step(opt, loss, params, run)
        bar.set_postfix(loss=f"{run:.3f}")
        do_eval = val_docs and ((step + 1) % args.eval_every == 0 or step == args.steps2 - 1)
        acc = evaluate_docs(model, processor, val_docs) if do_eval else ""
        if step % args.log_every == 0 or do_eval:
            log.log("llm", step, lv, acc)
            if bar_disable or do_eval:
                print(f"[stage2] step {step} canvas {cw * S.GRID}x{ch * S.GRID} loss {lv:.4f} run {run:.4f} "
                      f"val {acc} ({time.time() - log.t0:.0f}s)", flush=True)
        if do_eval and args.checkpoint_every_eval:
            save(model, processor, args.out, extra={"steps2_done": step + 1, "val_acc": acc,
                                                     "wall_s": round(time.time() - log.t0, 1)}, args=args)
    model.eval()
    return run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (save_pretrained)")
    ap.add_argument("--seed", type=int, default=0, help="model/data seed")
    ap.add_argument("--config", default="default", choices=sorted(CONFIGS))
    ap.add_argument("--steps1", type=int, default=500, help="stage-1 (vision tower) steps")
    ap.add_argument("--batch1", type=int, default=16)
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--warmup1", type=int, default=30)
    ap.add_argument("--steps2", type=int, default=3000, help="stage-2 (projector + LLM) steps")
    ap.add_argument("--images2", type=int, default=4, help="images per stage-2 step")
    ap.add_argument("--questions2", type=int, default=12, help="questions per image per stage-2 step")
    ap.add_argument("--lr2", type=float, default=2e-3)
    ap.add_argument("--warmup2", type=int, default=50)
    ap.add_argument("--decay-from2", type=int, default=400, help="stage-2 LR: inverse-sqrt decay after this step")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-n", type=int, default=100, help="val docs for the accuracy-vs-time log")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible for a fixed count)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="saved weights dtype")
    ap.add_argument("--smoke", action="store_true", help="tiny config, 2 steps per stage (for tests)")
    ap.add_argument("--no-bar", action="store_true", help="print lines instead of a progress bar")
    ap.add_argument("--save-stage1", type=Path, default=None, help="(dev) save the stage-1 vision tower here")
    ap.add_argument("--load-stage1", type=Path, default=None, help="(dev) skip stage 1, load the tower from here")
    ap.add_argument("--checkpoint-every-eval", action="store_true",
                    help="save the model into --out at every validation (the LR schedule does not depend on "
                         "--steps2, so the checkpoint after N steps equals a run with --steps2 N)")
    ap.add_argument("--proj-init2", default="standardize", choices=["default", "standardize"],
                    help="stage-2 projector initialisation (see init_projector)")
    ap.add_argument("--dense-weight2", type=float, default=1.0,
                    help="weight of the content objective at visual positions (see dense_word_loss); 0 = off")
    ap.add_argument("--dense-layer2", type=int, default=3,
                    help="hidden_states index of the dense 'words' objective (the input of that decoder layer)")
    ap.add_argument("--row-layer2", type=int, default=5,
                    help="hidden_states index of the dense 'row' objective (letters' row numbers); -1 = off")
    ap.add_argument("--col-layer2", type=int, default=6, help="the same for the column numbers; -1 = off")
    ap.add_argument("--readout-layer2", type=int, default=-1,
                    help="deep supervision: the residual after this decoder layer predicts the first answer "
                         "token (through the final norm and lm_head); -1 = off")
    ap.add_argument("--readout-weight2", type=float, default=0.5)
    ap.add_argument("--ground-weight2", type=float, default=0.0,
                    help="weight of the grounding objective (grounding_loss); 0 = off")
    ap.add_argument("--ground-layer2", type=int, default=3,
                    help="decoder layer of the grounding objective (position questions: --row-layer2 / --col-layer2)")
    ap.add_argument("--ground-heads2", type=int, default=2, help="heads of that layer the grounding objective trains")
    ap.add_argument("--count-head2", type=int, default=-1,
                    help="count questions ground --ground-heads2 heads from this one (not the look-up heads); "
                         "-1 = the same heads as the other questions")
    ap.add_argument("--code-layer2", type=int, default=-1,
                    help="shared-code objective (code_loss) on the residual entering this decoder layer; -1 = off")
    ap.add_argument("--code-weight2", type=float, default=0.5)
    ap.add_argument("--curriculum2", type=int, default=0,
                    help="stage-2 scene curriculum length in steps (sparse scenes first); 0 = off")
    args = ap.parse_args(argv)
    if args.smoke:
        args.config = "smoke"
        args.steps1 = args.steps2 = 2
        args.batch1, args.images2, args.questions2 = 2, 2, 2
        args.val_n, args.eval_every, args.log_every = 4, 2, 1
        args.warmup1 = args.warmup2 = 1
        args.dense_layer2, args.row_layer2, args.col_layer2, args.ground_layer2 = 1, 1, 1, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception:  # pragma: no cover
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    cfg = CONFIGS[args.config]
    model, processor = build(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f} M; config {args.config}: {json.dumps(cfg)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Logger(args.out / "train_log.csv", t0)
    val_docs = S.generate("val", args.val_n, seed=args.seed)
    bar_disable = args.no_bar or not sys.stderr.isatty()
    if args.load_stage1:
        model.model.vision_tower.load_state_dict(torch.load(args.load_stage1, weights_only=True))
        print(f"stage 1 loaded from {args.load_stage1}", flush=True)
    else:
        stage1(model, args, log, bar_disable)
        if args.save_stage1:
            torch.save(model.model.vision_tower.state_dict(), args.save_stage1)
    t1 = time.time() - t0
    print(f"stage 1 done in {t1:.0f}s", flush=True)
    stage2(model, processor, args, log, val_docs, bar_disable)
    wall = time.time() - t0
    info = save(model, processor, args.out, extra={"steps2_done": args.steps2, "stage1_s": round(t1, 1),
                                                    "train_wall_s": round(wall, 1)}, args=args)
    print(f"saved to {args.out} after {wall:.0f}s", flush=True)
    return info


def save(model, processor, out: Path, extra: dict, args) -> dict:
    """save_pretrained (safetensors) + processor + train_info.json into `out`, file by file atomically."""
    import shutil
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save.", dir=out))
    try:
        model.eval()
        model.to(getattr(torch, args.dtype)).save_pretrained(tmp)
        model.to(torch.float32)
        processor.save_pretrained(tmp)
        info = {"seed": args.seed, "config": CONFIGS[args.config], "generator_version": S.GENERATOR_VERSION,
                "params": sum(p.numel() for p in model.parameters()),
                **extra, "args": {k: str(v) for k, v in vars(args).items()}}
        (tmp / "train_info.json").write_text(json.dumps(info, indent=2))
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


if __name__ == "__main__":
    main()
