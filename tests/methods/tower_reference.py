"""Plain references for the tower-output methods (VisionZip, VisPruner) and DivPrune: the feature layer's
tensors and the LLM run on hand-built inputs, written without vtbench's shared machinery (no hooks, no
placeholder shrinking, no llm_reduce), for LLaVA-1.5 prompts with one image."""
from __future__ import annotations

import math

import torch


def feature_layer(model, pixel_values):
    """(h, cls_rows, keys) of LLaVA's feature layer (CLIP layer num_layers - 2) for one image, from an unpatched
    tower: h [N, D] its output, cls_rows[head][j] the softmax attention of the [CLS] query to token j (plain
    Python, eager), keys [H, N, d_h] its key projections."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    L = len(layers) + model.config.vision_feature_layer
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True)
        x, h = out.hidden_states[L][0], out.hidden_states[L + 1][0]
        layer = layers[L]
        y = layer.layer_norm1(x)
        H = layer.self_attn.num_heads
        q = layer.self_attn.q_proj(y).view(y.shape[0], H, -1).transpose(0, 1)
        k = layer.self_attn.k_proj(y).view(y.shape[0], H, -1).transpose(0, 1)
    d = q.shape[2]
    rows = []
    for head in range(H):
        logits = [float(q[head, 0] @ k[head, j]) / math.sqrt(d) for j in range(q.shape[1])]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        rows.append([v / sum(e) for v in e])
    return h, rows, k


def llm_logits_with_visual(model, input_ids, visual_feats):
    """Last-position logits of the unpatched LLaVA run on `input_ids` (one prompt, one image) whose
    placeholder run is cut to len(visual_feats) tokens filled with the projected `visual_feats` [k, D_vision]."""
    ids = input_ids[0].tolist()
    img = model.config.image_token_id
    first = ids.index(img)
    n = ids.count(img)
    k = visual_feats.shape[0]
    new = ids[:first] + [img] * k + ids[first + n:]
    t = torch.tensor([new])
    with torch.no_grad():
        emb = model.get_input_embeddings()(t)
        emb[0, first:first + k] = model.model.multi_modal_projector(visual_feats[None])[0]
        out = model.model.language_model(inputs_embeds=emb)
        return model.lm_head(out.last_hidden_state[:, -1])
