"""Train the embedded tiny LLaVA (`model=tiny`) from scratch on the `shapes` benchmark, on CPU.

Recipe (LLaVA-style two stages, sized for a 2-core CPU):

* Stage 1 -- vision tower. The CLIP-style tower is trained with a dense objective: from the
  feature layer (-2, the layer LLaVA feeds to the projector) every patch token classifies the
  contents of the grid cell it lies in (kind, colour, shape, letter) with small linear heads that
  are thrown away afterwards.
* Stage 2 -- projector + language model. The tower is frozen; the projector and the Llama-style
  decoder learn to answer the questions in the exact evaluation format
  ``"USER: <image>\\n{question} ASSISTANT: {answer}</s>"`` (loss on answer tokens only). The image
  prefix of the prompt does not depend on the question, so it is run once per image and its KV cache
  is shared by K questions about that image (a K-fold saving on the 144 visual tokens).

Everything is deterministic by ``--seed`` (fixed step counts, seeded data, deterministic torch
algorithms); progress goes to a tqdm bar and ``train_log.csv`` (stage, step, wall seconds, loss,
val accuracy). Run ``python -m harness.tiny_model.train --help``.
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
    """CLIP normalisation of 192x192 RGB PIL images (identical to the processor on these images)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def prompt_text(processor, question: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


class PromptCodec:
    """Token ids of the prompt pieces, split at the last image token (question-independent prefix)."""

    def __init__(self, processor, n_img: int):
        self.tok = processor.tokenizer
        self.processor = processor
        self.n_img = n_img
        self.image_token_id = self.tok.convert_tokens_to_ids("<image>")
        full = self.encode_prompt("What shape is in row 1, column 1?")
        last = max(i for i, t in enumerate(full) if t == self.image_token_id)
        self.prefix = full[: last + 1]
        assert self.prefix.count(self.image_token_id) == n_img, "unexpected number of image tokens"
        self._cache: dict[str, list[int]] = {}

    def encode_prompt(self, question: str) -> list[int]:
        text = prompt_text(self.processor, question).replace("<image>", "<image>" * self.n_img)
        return self.tok(text)["input_ids"]

    def suffix(self, question: str) -> list[int]:
        if question not in self._cache:
            ids = self.encode_prompt(question)
            assert ids[: len(self.prefix)] == self.prefix
            self._cache[question] = ids[len(self.prefix):]
        return self._cache[question]

    def answer(self, answer: str) -> list[int]:
        return self.tok(" " + answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
KIND_IDS = {"empty": 0, "shape": 1, "letter": 2}


def cell_labels(cells, grid_patches: int) -> torch.Tensor:
    """Per-patch labels (N, 6): kind, colour(+1), shape(+1), letter(+1) (0 = none / empty), cell row, cell col.

    The centre patch of each grid cell gets the cell's contents; every other patch is 'empty'.
    """
    per = grid_patches // S.GRID
    lab = np.zeros((grid_patches, grid_patches, 6), dtype=np.int64)
    for idx, c in enumerate(cells):
        r, col = divmod(idx, S.GRID)
        # every patch: the row and column of its grid cell (an explicit position code for the LLM)
        lab[r * per:(r + 1) * per, col * per:(col + 1) * per, 4] = r
        lab[r * per:(r + 1) * per, col * per:(col + 1) * per, 5] = col
        v = [KIND_IDS[c["kind"]], 0, 0, 0]
        if c["kind"] == "shape":
            v[1] = S.COLOUR_NAMES.index(c["colour"]) + 1
            v[2] = S.SHAPES.index(c["shape"]) + 1
        elif c["kind"] == "letter":
            v[3] = S.LETTERS.index(c["letter"]) + 1
        # objects are drawn around the cell centre: its centre patch carries the labels
        lab[r * per + per // 2, col * per + per // 2, :4] = v
    return torch.from_numpy(lab.reshape(-1, 6))


def train_scene(seed: int, index: int, p_empty: float = S.P_EMPTY):
    rng = S.doc_rng(seed, "train", index)
    cells = S.make_scene(rng, p_empty=p_empty)
    return cells, rng


_PLURAL_TO_SHAPE = {v: k for k, v in S.SHAPE_PLURALS.items()}


def question_cells(cells, qtype: str, question: str) -> list[int]:
    """Grid cells (row-major indices) a question is about (empty for a count of zero)."""
    import re

    if qtype in ("colour", "shape", "letter"):
        m = re.search(r"row (\d+), column (\d+)", question)
        return [(int(m.group(1)) - 1) * S.GRID + int(m.group(2)) - 1]
    if qtype == "position":
        letter = re.search(r"letter (\w)", question).group(1)
        return [i for i, c in enumerate(cells) if c.get("letter") == letter]
    if qtype == "count":
        w = question.split("How many ")[1].split(" ")[0]
        if w in S.COLOURS:
            return [i for i, c in enumerate(cells) if c.get("colour") == w]
        shape = _PLURAL_TO_SHAPE.get(w)
        return [i for i, c in enumerate(cells) if c.get("shape") == shape]
    return []


def gather_targets(tokens: list[str], qtype: str) -> dict[int, int]:
    """Question-token targets for the first hop (head -> suffix index of the token to read).

    colour/shape/letter: head 0 -> the row number, head 1 -> the column number; position: heads 0
    and 1 -> the letter, head 2 -> 'row'/'column'; count: head 0 -> the colour word or the plural.
    """
    def after(word, skip_space=False):
        if word not in tokens:
            return None
        j = tokens.index(word) + 1
        if skip_space and j < len(tokens) and tokens[j] == "\u0120":
            j += 1
        return j if j < len(tokens) else None

    out = {}
    if qtype in ("colour", "shape", "letter"):
        r, c = after("\u0120row"), after("\u0120column")
        if r is not None and c is not None:
            out = {0: r, 1: c}
    elif qtype == "position":
        j = after("\u0120letter", skip_space=True)
        k = after("Which")
        if j is not None and k is not None:
            out = {0: j, 1: j, 2: k}
    elif qtype == "count":
        j = after("\u0120many")
        if j is not None:
            out = {0: j}
    return out


def routing_loss(model, out_hidden, cache, layer: int, query_pos, targets, P: int, n_heads_sup: int = 1,
                 head: int | None = None, uniform: bool = False):
    """Attention supervision (stage-2 auxiliary loss): at the answer-predicting position, the first
    `n_heads_sup` heads of decoder layer `layer` should attend to the centre patches of the cells the
    question is about. `query_pos[i]` is the suffix index of that position in sample i, `targets[i]`
    the prefix indices of the wanted image tokens (samples without targets are skipped)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    dec = lm.layers[layer]
    attn = dec.self_attn
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return None
    idx = torch.tensor(keep)
    qp = torch.tensor([query_pos[i] for i in keep])
    h = out_hidden[layer][idx, qp]  # input of `layer` at the query positions (n, D)
    x = dec.input_layernorm(h)
    hd = attn.head_dim
    hs = slice(head, head + 1) if head is not None else slice(0, n_heads_sup)
    q = attn.q_proj(x).view(len(keep), -1, hd)[:, hs]  # n, H', hd
    pos_ids = (P + qp)[:, None]
    cos, sin = lm.rotary_emb(x[:, None], pos_ids)
    q, _ = apply_rotary_pos_emb(q[:, :, None], q[:, :, None], cos, sin)  # n, H', 1, hd
    keys = cache.layers[layer].keys[idx, hs]  # n, H', T, hd
    scores = (q @ keys.transpose(-1, -2)).squeeze(-2) * attn.scaling  # n, H', T
    T = keys.shape[-2]
    causal = torch.arange(T)[None, :] > (P + qp)[:, None]
    scores = scores.masked_fill(causal[:, None], float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)
    tmask = torch.zeros(len(keep), T, dtype=torch.bool)
    for j, i in enumerate(keep):
        tmask[j, targets[i]] = True
    if uniform:  # cross-entropy with the uniform distribution over the targets
        n_t = tmask.sum(-1, keepdim=True).clamp(min=1)  # n, 1
        return -(logp.masked_fill(~tmask[:, None], 0.0).sum(-1) / n_t).mean()
    lp = torch.logsumexp(logp.masked_fill(~tmask[:, None], float("-inf")), dim=-1)  # n, H'
    return -lp.mean()


def cell_words(cell: dict, row: int, col: int, what: str, with_letter: bool = False) -> list[str]:
    """The answer words describing a grid cell for the dense objective `what`:
    'words' -> a shape's colour and shape, a letter's letter; 'row' / 'col' -> a letter's row / column
    number (1-based; the answer of the position questions), preceded by the letter itself when
    `with_letter` (so the keys of that layer still tell letters apart); [] = no target."""
    if what == "words":
        if cell["kind"] == "shape":
            return [cell["colour"], cell["shape"]]
        return [cell["letter"].lower()] if cell["kind"] == "letter" else []
    if cell["kind"] != "letter":
        return []
    return ([cell["letter"].lower()] if with_letter else []) + [str((row if what == "row" else col) + 1)]


def dense_word_loss(model, hidden, scenes, codec, gp: int, img_start: int, what: str = "words",
                    with_letter: bool = False):
    """LM-side dense objective (the decoder's counterpart of stage 1): at the centre patch of every
    grid cell with a target (`cell_words`), the decoder's residual stream `hidden` (B, T, D) read
    through the final norm and the LM head predicts the cell's answer words (several words share the
    probability equally). The answers are then present at the visual positions in the unembedding's
    own coordinates, so a head that attends to the asked cell only has to copy them. Different layers
    get different targets ('words' early, then the letters' row, then their column), so a head that
    reads a cell at the layer of the question's kind finds only that kind of answer there."""
    lm = model.model.language_model
    per = gp // S.GRID
    rows, targets = [], []
    for b, cells in enumerate(scenes):
        for idx, c in enumerate(cells):
            r, col = divmod(idx, S.GRID)
            words = cell_words(c, r, col, what, with_letter)
            if not words:
                continue
            rows.append((b, img_start + (r * per + per // 2) * gp + (col * per + per // 2)))
            targets.append([codec.answer(w)[0] for w in words])
    if not rows:
        return None
    bi = torch.tensor([r[0] for r in rows])
    ti = torch.tensor([r[1] for r in rows])
    logp = torch.log_softmax(model.lm_head(lm.norm(hidden[bi, ti])), dim=-1)
    loss = 0.0
    for j, t in enumerate(targets):
        loss = loss - logp[j, t].mean()
    return loss / len(targets)


def curriculum_p_empty(step: int, steps: int) -> float:
    """Stage-2 curriculum: sparse scenes first (about 1-2 objects), linearly up to the benchmark's
    density by `steps`. Sparse scenes teach the read-out before the routing."""
    if steps <= 0 or step >= steps:
        return S.P_EMPTY
    start = 0.9
    return start + (S.P_EMPTY - start) * step / steps


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


def stage1(model, args, log: Logger, bar_disable: bool):
    from tqdm import tqdm

    vt = model.model.vision_tower
    d = model.config.vision_config.hidden_size
    gp = model.config.vision_config.image_size // model.config.vision_config.patch_size
    heads = nn.ModuleList([nn.Linear(d, 3), nn.Linear(d, len(S.COLOUR_NAMES) + 1),
                           nn.Linear(d, len(S.SHAPES) + 1), nn.Linear(d, len(S.LETTERS) + 1),
                           nn.Linear(d, S.GRID), nn.Linear(d, S.GRID)])
    params = list(vt.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr1, weight_decay=0.01, betas=(0.9, 0.98))
    vt.train()
    bar = tqdm(range(args.steps1), desc="stage1 vision", disable=bar_disable, mininterval=5)
    run = None
    idx = 0
    for step in bar:
        imgs, labs = [], []
        for _ in range(args.batch1):
            cells, _ = train_scene(args.seed, 10_000_000 + idx)
            idx += 1
            imgs.append(S.render(cells))
            labs.append(cell_labels(cells, gp))
        pv = pixels(imgs)
        lab = torch.stack(labs)  # B, N, 4
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps1, args.lr1, args.warmup1)
        out = vt(pv, output_hidden_states=True)
        h = out.hidden_states[model.config.vision_feature_layer][:, 1:]  # B, N, d
        loss = 0.0
        accs = []
        for k, head in enumerate(heads):
            logits = head(h).flatten(0, 1)
            y = lab[..., k].flatten()
            m = (y >= 0) if k in (0, 4, 5) else (y > 0)
            if m.any():
                loss = loss + nn.functional.cross_entropy(logits[m], y[m])
                accs.append(float((logits[m].argmax(-1) == y[m]).float().mean()))
        lv, run = optimizer_step(opt, loss, params, run)
        bar.set_postfix(loss=f"{run:.3f}")
        if step % args.log_every == 0 or step == args.steps1 - 1:
            log.log("vision", step, lv)
            if bar_disable:
                acc_s = " ".join(f"{a:.2f}" for a in accs)
                print(f"[stage1] step {step} loss {lv:.4f} acc(kind,colour,shape,letter,row,col) {acc_s} "
                      f"({time.time() - log.t0:.0f}s)", flush=True)
    vt.eval()
    return run


def stage2(model, processor, args, log: Logger, val_docs, bar_disable: bool):
    from tqdm import tqdm
    from transformers import DynamicCache

    vc = model.config.vision_config
    gp = vc.image_size // vc.patch_size
    n_img = gp ** 2
    codec = PromptCodec(processor, n_img)
    base = model.model
    lm = base.language_model
    emb = lm.get_input_embeddings()
    for p in base.vision_tower.parameters():
        p.requires_grad_(False)
    base.vision_tower.eval()
    if args.proj_init2 == "standardize":
        rng0 = [train_scene(args.seed, 20_000_000 + i)[0] for i in range(32)]
        with torch.no_grad():
            f0 = base.vision_tower(pixels([S.render(c) for c in rng0]), output_hidden_states=True)
        init_projector(model, f0.hidden_states[model.config.vision_feature_layer][:, 1:], args.seed)
    params = list(base.multi_modal_projector.parameters()) + list(lm.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr2, weight_decay=0.01, betas=(0.9, 0.98))
    prefix = torch.tensor(codec.prefix)
    img_pos = prefix == codec.image_token_id
    P = len(codec.prefix)
    pad = processor.tokenizer.pad_token_id
    bar = tqdm(range(args.steps2), desc="stage2 llm", disable=bar_disable, mininterval=5)
    run = None
    idx = 0
    best = -1.0
    for step in bar:
        model.train()
        base.vision_tower.eval()
        imgs, qas, scenes = [], [], []
        for _ in range(args.images2):
            cells, rng = train_scene(args.seed, idx, curriculum_p_empty(step, args.curriculum2))
            idx += 1
            imgs.append(S.render(cells))
            scenes.append(cells)
            qs = S.scene_questions(cells, rng, args.questions2)
            while len(qs) < args.questions2:  # rare: pad with repeats
                qs.append(qs[len(qs) % max(1, len(qs))])
            qas.append(qs)
        B, K = len(imgs), args.questions2
        with torch.no_grad():
            feats = base.vision_tower(pixels(imgs), output_hidden_states=True)
            feats = feats.hidden_states[model.config.vision_feature_layer][:, 1:]
        img_emb = base.multi_modal_projector(feats)  # B, n_img, D
        pre = emb(prefix)[None].expand(B, -1, -1).clone()
        pre[:, img_pos] = img_emb
        cache = DynamicCache(config=model.config.text_config)
        pout = lm(inputs_embeds=pre, past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(P)[None].expand(B, -1), output_hidden_states=args.dense_weight2 > 0)
        dloss = None
        if args.dense_weight2 > 0 and step < args.route_steps2:
            for what, layer in (("words", args.dense_layer2), ("row", args.row_layer2), ("col", args.col_layer2)):
                if layer < 0:
                    continue
                dl = dense_word_loss(model, pout.hidden_states[layer], scenes, codec, gp,
                                     int(img_pos.nonzero()[0]), what, args.dense_pos_letter2)
                if dl is not None:
                    dloss = dl if dloss is None else dloss + dl
        cache.batch_repeat_interleave(K)
        seqs, tgts, qpos, rtargets, gtargets, rlayers, ctargets = [], [], [], [], [], [], []
        per = gp // S.GRID
        img_start = int(img_pos.nonzero()[0])
        for cells_i, qs in zip(scenes, qas):
            for qt, q, a in qs[:K]:
                s = codec.suffix(q)
                ans = codec.answer(a)
                seqs.append(s + ans)
                tgts.append([-100] * (len(s) - 1) + ans + [-100])
                qpos.append(len(s) - 1)
                if args.gather_layer2 >= 0:
                    gtargets.append(gather_targets(codec.tok.convert_ids_to_tokens(s), qt))
                # count questions: one head spreads its attention evenly over the BOS token (a sink) and
                # the counted cells, so its output moves away from the sink's value in proportion n/(n+1)
                ctargets.append([0] + [img_start + (r * per + per // 2) * gp + (c * per + per // 2)
                                       for r, c in (divmod(i, S.GRID) for i in question_cells(cells_i, qt, q))]
                                if qt == "count" and args.count_head2 >= 0 else [])
                rlayers.append(args.route_layer2 if qt != "position" or args.row_layer2 < 0 else
                               (args.row_layer2 if q.startswith("Which row") else args.col_layer2))
                rtargets.append([] if (qt == "count" and args.route_skip_count2) else
                                [img_start + (r * per + per // 2) * gp + (c * per + per // 2)
                                 for r, c in (divmod(i, S.GRID) for i in question_cells(cells_i, qt, q))])
        L = max(len(x) for x in seqs)
        ids = torch.full((B * K, L), pad, dtype=torch.long)
        tg = torch.full((B * K, L), -100, dtype=torch.long)
        for i, (x, t) in enumerate(zip(seqs, tgts)):
            ids[i, :len(x)] = torch.tensor(x)
            tg[i, :len(t)] = torch.tensor(t)
        out = lm(inputs_embeds=emb(ids), past_key_values=cache, use_cache=True,
                 position_ids=(P + torch.arange(L))[None].expand(B * K, -1),
                 output_hidden_states=args.route_weight2 > 0)
        logits = model.lm_head(out.last_hidden_state)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tg.flatten(), ignore_index=-100)
        rloss = None
        if args.route_weight2 > 0 and step < args.route_steps2:
            rloss = None
            for layer in sorted(set(rlayers)):
                tl = [t if lyr == layer else [] for t, lyr in zip(rtargets, rlayers)]
                rl = routing_loss(model, out.hidden_states, cache, layer, qpos, tl, P, args.route_heads2)
                if rl is not None:
                    rloss = rl if rloss is None else rloss + rl
            if args.count_head2 >= 0:
                cl = routing_loss(model, out.hidden_states, cache, args.route_layer2, qpos, ctargets, P,
                                  head=args.count_head2, uniform=True)
                if cl is not None:
                    rloss = cl if rloss is None else rloss + cl
            if rloss is not None:
                loss = loss + args.route_weight2 * rloss
            if args.readout_layer2 >= 0:
                # deep supervision: the residual right after the routing layer already predicts the
                # first answer token through the final norm + lm_head
                qp_t = torch.tensor(qpos)
                hmid = out.hidden_states[args.readout_layer2 + 1][torch.arange(len(qpos)), qp_t]
                lg = model.lm_head(lm.norm(hmid))
                first = tg[torch.arange(len(qpos)), qp_t]
                loss = loss + args.route_weight2 * nn.functional.cross_entropy(lg, first, ignore_index=-100)
            if args.gather_layer2 >= 0:
                for hd_i in range(min(3, model.config.text_config.num_attention_heads)):
                    tg_h = [[P + g[hd_i]] if hd_i in g else [] for g in gtargets]
                    gl = routing_loss(model, out.hidden_states, cache, args.gather_layer2, qpos, tg_h, P,
                                      head=hd_i)
                    if gl is not None:
                        loss = loss + args.route_weight2 * gl / 3
        if dloss is not None:
            loss = loss + args.dense_weight2 * dloss
        for g in opt.param_groups:
            g["lr"] = lr_rsqrt(step, args.lr2, args.warmup2, args.decay_from2)
        lv, run = optimizer_step(opt, loss, params, run)
        bar.set_postfix(loss=f"{run:.3f}")
        if rloss is not None and step % args.log_every == 0 and bar_disable:
            print(f"[stage2] step {step} routing loss {float(rloss.detach()):.4f}", flush=True)
        do_eval = val_docs and ((step + 1) % args.eval_every == 0 or step == args.steps2 - 1)
        acc = evaluate_docs(model, processor, val_docs) if do_eval else ""
        if step % args.log_every == 0 or do_eval:
            log.log("llm", step, lv, acc)
            if bar_disable or do_eval:
                print(f"[stage2] step {step} loss {lv:.4f} run {run:.4f} val {acc} ({time.time() - log.t0:.0f}s)",
                      flush=True)
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
    ap.add_argument("--steps1", type=int, default=150, help="stage-1 (vision tower) steps")
    ap.add_argument("--batch1", type=int, default=16)
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--warmup1", type=int, default=30)
    ap.add_argument("--steps2", type=int, default=2000, help="stage-2 (projector + LLM) steps")
    ap.add_argument("--images2", type=int, default=4, help="images per stage-2 step")
    ap.add_argument("--questions2", type=int, default=12, help="questions per image per stage-2 step")
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--warmup2", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-n", type=int, default=100, help="val docs for the accuracy-vs-time log")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="saved weights dtype")
    ap.add_argument("--smoke", action="store_true", help="tiny config, 2 steps per stage (for tests)")
    ap.add_argument("--no-bar", action="store_true", help="print lines instead of a progress bar")
    ap.add_argument("--save-stage1", type=Path, default=None, help="(dev) save the stage-1 vision tower here")
    ap.add_argument("--load-stage1", type=Path, default=None, help="(dev) skip stage 1, load the tower from here")
    ap.add_argument("--checkpoint-every-eval", action="store_true",
                    help="save the model into --out at every validation (the LR schedule does not depend on "
                         "--steps2, so the checkpoint after N steps equals a run with --steps2 N)")
    ap.add_argument("--route-weight2", type=float, default=0.0,
                    help="weight of the stage-2 attention-routing auxiliary loss (0 = off)")
    ap.add_argument("--route-layer2", type=int, default=3, help="decoder layer whose heads get routing supervision")
    ap.add_argument("--route-heads2", type=int, default=1, help="how many heads of that layer are supervised")
    ap.add_argument("--gather-layer2", type=int, default=-1,
                    help="also supervise the first hop: heads 0-2 of this decoder layer read the question's "
                         "row/column number (or letter / counted word) at the answer position; -1 = off")
    ap.add_argument("--readout-layer2", type=int, default=-1,
                    help="deep supervision: the residual after this decoder layer predicts the first answer "
                         "token (through the final norm and lm_head); -1 = off")
    ap.add_argument("--route-skip-count2", action="store_true",
                    help="no routing supervision for count questions (leave the heads free to count)")
    ap.add_argument("--route-steps2", type=int, default=10**9, help="apply the routing loss for this many steps")
    ap.add_argument("--curriculum2", type=int, default=0,
                    help="stage-2 curriculum length in steps (sparse scenes first); 0 = off")
    ap.add_argument("--dense-weight2", type=float, default=0.0,
                    help="weight of the LM-side dense word objective at visual positions (see dense_word_loss)")
    ap.add_argument("--dense-layer2", type=int, default=3,
                    help="hidden_states index for the dense objective (the input of that decoder layer)")
    ap.add_argument("--row-layer2", type=int, default=-1,
                    help="dense objective 'row' (letters' row numbers) at this hidden_states index, and the "
                         "routing of 'Which row' questions at this decoder layer; -1 = off")
    ap.add_argument("--col-layer2", type=int, default=-1,
                    help="the same for the column numbers and 'Which column' questions")
    ap.add_argument("--dense-pos-letter2", action="store_true",
                    help="the row / column dense targets of a letter also name the letter (half each)")
    ap.add_argument("--count-head2", type=int, default=-1,
                    help="count questions: this head of --route-layer2 attends evenly to BOS and the counted "
                         "cells (a sink makes the count readable); -1 = off")
    ap.add_argument("--proj-init2", default="default", choices=["default", "standardize"],
                    help="stage-2 projector initialisation (see init_projector)")
    ap.add_argument("--decay-from2", type=int, default=400, help="stage-2 LR: inverse-sqrt decay after this step")
    args = ap.parse_args(argv)
    if args.smoke:
        args.config = "smoke"
        args.steps1 = args.steps2 = 2
        args.batch1, args.images2, args.questions2 = 2, 2, 2
        args.val_n, args.eval_every, args.log_every = 4, 2, 1
        args.warmup1 = args.warmup2 = 1
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
        info = {"seed": args.seed, "config": CONFIGS[args.config],
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
