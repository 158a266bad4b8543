"""A deliberately plain decoder for the reference implementations of the in-LLM methods' tests
(PyramidDrop, DART): batch 1, one token list, every layer computed by hand with loops over heads and the
full eager attention matrix (causal mask, softmax, A V), RoPE applied from the model's inv_freq; only the
weights (linear layers, RMSNorms) come from the model. No SDPA, no `llm_reduce`, no cache.

The tokens a method keeps are chosen by the test's own plain selection, between layers: `run` calls
`select(layer, h, idx, pos)` before every layer and keeps the rows it returns.
"""
from __future__ import annotations

import torch


def lm_inputs(model, adapter, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [n, d], position ids [n]) the unpatched model gives its language model for a batch-1
    prompt (image features scattered in), captured with a forward pre-hook."""
    got = {}

    def hook(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"]
        got["pos"] = kwargs.get("position_ids")

    h = adapter.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    emb = got["embeds"][0]
    pos = got["pos"]
    pos = torch.arange(emb.shape[0]) if pos is None else pos.reshape(-1, emb.shape[0])[-1]
    return emb, pos


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of x [n, d_h] at positions pos [n] (rotate-half convention)."""
    freqs = pos[:, None].float() * inv_freq[None].float()
    emb = torch.cat([freqs, freqs], dim=-1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[:, half:], x[:, :half]], dim=-1)
    return x * emb.cos() + rot * emb.sin()


def heads_qkv(layer, x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, which="qkv") -> dict:
    """Per-head q, k, v lists ([n, d_h] each; k and v repeated for every query head) of layer's attention on
    x (already input-normed), RoPE applied to q and k."""
    attn = layer.self_attn
    hd = attn.head_dim
    n_heads = attn.q_proj.out_features // hd
    n_kv = attn.k_proj.out_features // hd
    out = {}
    for name, proj, count in (("q", attn.q_proj, n_heads), ("k", attn.k_proj, n_kv), ("v", attn.v_proj, n_kv)):
        if name not in which:
            continue
        y = proj(x)
        per = [y[:, j * hd:(j + 1) * hd] for j in range(count)]
        if name != "v":
            per = [rotate(t, pos, inv_freq) for t in per]
        if count != n_heads:
            per = [per[j // (n_heads // count)] for j in range(n_heads)]
        out[name] = per
    return out


def attention_matrix(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The full causal softmax attention [n, n] of one head."""
    n = q.shape[0]
    logits = (q @ k.T) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def layer_forward(layer, h: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """One pre-norm decoder layer on h [n, d] by hand."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    qkv = heads_qkv(layer, x, pos, inv_freq)
    outs = []
    for q, k, v in zip(qkv["q"], qkv["k"], qkv["v"]):
        outs.append(attention_matrix(q, k, attn.scaling) @ v)
    h = h + attn.o_proj(torch.cat(outs, dim=-1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def run(model, adapter, inputs, select) -> tuple[torch.Tensor, dict]:
    """Last-position logits of the plain decoder, with `select(layer, h, idx, pos)` -> kept rows (or None)
    applied before every layer; returns (logits [V], {layer: prefill indices alive from that layer on})."""
    lm = adapter.language_model
    emb, pos = lm_inputs(model, adapter, inputs)
    inv_freq = lm.rotary_emb.inv_freq
    h, idx = emb, torch.arange(emb.shape[0])
    kept = {}
    with torch.no_grad():
        for i, layer in enumerate(adapter.llm_layers):
            rows = select(i, h, idx, pos[idx])
            if rows is not None:
                h, idx = h[rows], idx[rows]
                kept[i] = idx.tolist()
            h = layer_forward(layer, h, pos[idx], inv_freq)
        logits = model.lm_head(lm.norm(h[-1:]))[0]
    return logits, kept


def assert_sdpa_everywhere(model, inputs, steps: int = 2) -> None:
    """Every LLM layer's attention runs through torch's SDPA, in the prefill and in every decode step, and
    no layer falls back to eager attention (the modeling module's `eager_attention_forward` is never
    called; the attention implementation stays "sdpa")."""
    import contextlib
    import sys
    from unittest import mock

    from harness.models import get_adapter

    adapter = get_adapter(model)
    layers = adapter.llm_layers
    assert adapter.text_config._attn_implementation == "sdpa"
    active: list[int] = []
    calls: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        if active:
            calls.append(active[-1])
        return real(*args, **kwargs)

    def eager(*args, **kwargs):
        raise AssertionError("a decoder layer fell back to eager attention")

    def leave(module, args, output):
        active.pop()  # (returns None: the output is left as it is)

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: active.append(i) and None))
        hooks.append(layer.self_attn.register_forward_hook(leave))
    modeling = sys.modules[type(layers[0].self_attn).__module__]
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa))
        if hasattr(modeling, "eager_attention_forward"):
            stack.enter_context(mock.patch.object(modeling, "eager_attention_forward", eager))
        try:
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        finally:
            for h in hooks:
                h.remove()
    n = len(layers)
    assert sorted(set(calls)) == list(range(n)), calls
    assert len(calls) == n * steps, (len(calls), n, steps)  # one prefill + (steps - 1) decode forwards
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in layers)
