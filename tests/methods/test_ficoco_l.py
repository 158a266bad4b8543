"""FiCoCo-L: no-op identity, the merge step == a direct per-sample transcription of eqs. 2-4 on the eager
attention (left-padded batch), token counts / cache lengths per layer, cached == uncached greedy decoding
(batch 1 and left-padded batch 4; Llama/Mistral/Qwen2 incl. GQA; both variants), counted FLOPs ==
analytic, schedules (incl. the `final_ratio` budget on LLaVA-1.5 and LLaVA-NeXT), errors, the shipped
config."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import methods
import methods.ficoco_l as FL
from harness.efficiency.flops import analytic_prefill, count_prefill, layouts_from_inputs
from harness.models.adapter import get_adapter
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from methods.base import MethodError
from methods.ficoco_l import final_count, merge_schedule, ratio_final_tokens
from tests.methods.helpers import check_decode_consistency, forward, make_inputs, tiny

ROOT = Path(__file__).resolve().parents[2]


def apply(model, **params):
    m = methods.build("ficoco_l", params)
    return m.apply(model, get_adapter(model)), m


@pytest.mark.parametrize("params", [{"r": 0, "start_layer": 2}, {"final_tokens": 64, "start_layer": 1},
                                    {"schedule": [0, 0, 0], "start_layer": 1}, {"final_ratio": 1.0, "start_layer": 1}])
def test_noop_identical_logits(params):
    base, proc = tiny("llava", "mistral", gqa=True)
    inp = make_inputs(proc, (0, 1, 2, 3))
    model, _ = apply(copy.deepcopy(base), **params)
    assert torch.equal(forward(model, inp).logits, forward(base, inp).logits)


def test_schedules():
    layers = list(range(5, 32))
    assert sum(merge_schedule(576, layers, 14, None, None).values()) == 27 * 14  # 198 left (code r=14)
    for final in (192, 128, 64):
        sch = merge_schedule(576, layers, 14, None, final)
        assert 576 - sum(sch.values()) == final and max(sch.values()) - min(sch.values()) <= 1
    assert merge_schedule(10, [1, 2, 3], 4, None, None) == {1: 4, 2: 4, 3: 0}  # keeps > 0 left
    assert merge_schedule(10, [1, 2], 0, [3, 9], None) == {1: 3, 2: 6}


def test_final_ratio_schedule():
    """final = max(1, round(final_ratio * n_visual)), then spread like final_tokens."""
    layers = list(range(5, 32))
    for final in (192, 128, 64):  # LLaVA-1.5: ratio k/576 of 576 is k
        assert ratio_final_tokens(576, final / 576) == final
        assert merge_schedule(576, layers, 14, None, final_count(576, None, final / 576)) == merge_schedule(
            576, layers, 14, None, final)
    assert ratio_final_tokens(127, 20 / 42) == 60  # NeXT tiny: 3 crops x 42 + newline, 20 of 42 kept
    assert ratio_final_tokens(5 * 576 + 1, 192 / 576) == 960  # 5 packed 576-token crops + newline
    assert ratio_final_tokens(10, 0.01) == 1 and ratio_final_tokens(10, 1.0) == 10
    assert final_count(100, None, None) is None and final_count(100, 7, None) == 7
    sch = merge_schedule(127, [1, 2, 3], 14, None, final_count(127, None, 20 / 42))
    assert sch == {1: 23, 2: 22, 3: 22} and 127 - sum(sch.values()) == 60


def test_final_ratio_equals_final_tokens_on_llava():
    base, proc = tiny("llava", "llama")
    inp = make_inputs(proc, (0, 1, 2, 3))
    a, ma = apply(copy.deepcopy(base), start_layer=1, final_tokens=16)
    b, mb = apply(copy.deepcopy(base), start_layer=1, final_ratio=0.25)
    assert torch.equal(forward(a, inp).logits, forward(b, inp).logits)
    layout = layouts_from_inputs(base, make_inputs(proc, (1,)))[0]
    assert analytic_prefill(base.config, layout, ma) == analytic_prefill(base.config, layout, mb)


def test_final_ratio_llava_next_counts():
    """NeXT: the ratio applies to every visual placeholder the LLM gets (crops + image_newline tokens)."""
    model, proc = tiny("llava_next", "llama")
    apply(model, start_layer=1, final_ratio=0.3)
    inp = make_inputs(proc, (1,), size=(64, 128))
    n = int((inp["input_ids"] == model.config.image_token_id).sum())
    P = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    sched = merge_schedule(n, [1, 2, 3], 0, None, ratio_final_tokens(n, 0.3))
    assert get_context(model).visual_tokens_per_layer == [n, n, n - sched[1], n - sched[1] - sched[2]]
    assert out.past_key_values.get_seq_length(3) == P - sched[1] - sched[2]
    assert n - sum(sched.values()) == round(0.3 * n)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_final_ratio_counted_flops_equal_analytic(variant):
    model, proc = tiny("llava_next", "qwen2", gqa=True)
    _, method = apply(model, start_layer=1, final_ratio=0.3, variant=variant)
    inp = make_inputs(proc, (3,), size=(128, 64))
    layout = layouts_from_inputs(model, inp)[0]
    assert count_prefill(model, inp).flops == analytic_prefill(model.config, layout, method)
    assert analytic_prefill(model.config, layout, method)["llm"] < analytic_prefill(model.config, layout, None)["llm"]


def test_token_counts_and_cache_lengths():
    model, proc = tiny("llava", "llama")
    apply(model, start_layer=1, schedule=[8, 16, 4])
    inp = make_inputs(proc, (2,))
    P = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    assert get_context(model).visual_tokens_per_layer == [64, 64, 56, 40]
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [P, P, P - 8, P - 24]


def _reference_merge(A, X, visual, valid, r, beta=0.6, gamma=0.6, eps=0.998):
    """Eqs. 2-4 (paper variant) for one sample, transcribed directly: A [P, P] head-mean causal attention,
    X [P, d] post-attention hidden states."""
    V = [i for i in range(len(visual)) if visual[i]]
    T = [k for k in range(V[0] + 1, len(visual)) if valid[k] and not visual[k]]
    s = torch.stack([beta * A[i, V].mean() - (1 - beta) * A[T, i].mean() for i in V])
    S = sorted(int(o) for o in torch.topk(s, r).indices)
    keep = [o for o in range(len(V)) if o not in S]
    X = X.clone()
    new = {}
    alphas = torch.zeros(len(S), len(keep))
    for a, si in enumerate(S):
        i = V[si]
        C = torch.stack([gamma * A[i, V[tj]] + (1 - gamma) * torch.stack([A[k, i] * A[k, V[tj]] for k in T]).mean()
                         for tj in keep])
        tau = torch.quantile(C, eps)
        Cj = torch.where(C >= tau, C, torch.zeros_like(C))
        alphas[a] = Cj / Cj.sum()
    for b, tj in enumerate(keep):
        j = V[tj]
        num = X[j] + sum(alphas[a, b] * X[V[si]] for a, si in enumerate(S))
        new[j] = num / (1 + alphas[:, b].sum())
    for j, x in new.items():
        X[j] = x
    dropped = {V[si] for si in S}
    return X[[p for p in range(X.shape[0]) if p not in dropped]]


@pytest.mark.parametrize("lm,gqa,block", [("llama", False, 128), ("qwen2", True, 128), ("llama", False, 7)])
def test_merge_equals_direct_transcription(lm, gqa, block, monkeypatch):
    """Against eager attention weights; block 7 splits the 64 visual rows into 10 score blocks (left-padded
    batch: each block's key range is the max over the samples)."""
    monkeypatch.setattr(FL, "SCORE_BLOCK", block)
    layer, r = 2, 12
    base, proc = tiny("llava", lm, gqa=gqa, attn="eager")
    inp = make_inputs(proc, (0, 1, 2))
    att = forward(base, inp, output_attentions=True).attentions[layer].mean(1)  # [B, P, P]

    model = copy.deepcopy(base)
    apply(model, start_layer=layer, end_layer=layer, r=r)
    lyr = get_adapter(model).llm_layers[layer]
    seen = {}
    h1 = lyr.input_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    h2 = lyr.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0]))
    h3 = lyr.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("merged", a[0]))
    forward(model, inp)
    for h in (h1, h2, h3):
        h.remove()
    X_pre = seen["x"] + seen["attn"]
    visual = inp["input_ids"] == base.config.image_token_id
    valid = inp["attention_mask"].bool()
    for b in range(3):
        ref = _reference_merge(att[b], X_pre[b], visual[b].tolist(), valid[b].tolist(), r)
        torch.testing.assert_close(seen["merged"][b], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lm,gqa,variant,positions", [
    ("llama", False, "paper", "keep"), ("mistral", True, "code", "renumber"), ("qwen2", True, "paper", "renumber"),
])
def test_cached_equals_uncached(lm, gqa, variant, positions):
    model, proc = tiny("llava", lm, gqa=gqa)
    apply(model, start_layer=1, final_tokens=16, variant=variant, positions=positions)
    check_decode_consistency(model, proc, steps=2)


@pytest.mark.slow
def test_cached_equals_uncached_llava_next():
    model, proc = tiny("llava_next", "llama")
    apply(model, start_layer=2, r=40, variant="code")
    check_decode_consistency(model, proc, steps=2, size=(64, 128))


@pytest.mark.parametrize("variant,block", [("paper", 128), ("code", 128), ("paper", 10)])
def test_counted_flops_equal_analytic(variant, block, monkeypatch):
    monkeypatch.setattr(FL, "SCORE_BLOCK", block)
    model, proc = tiny("llava", "qwen2", gqa=True)
    _, method = apply(model, start_layer=1, schedule=[10, 0, 20], variant=variant)
    inp = make_inputs(proc, (3,))
    layout = layouts_from_inputs(model, inp)[0]
    counted = count_prefill(model, inp).flops
    analytic = analytic_prefill(model.config, layout, method)
    assert counted == analytic
    assert analytic["llm"] < analytic_prefill(model.config, layout, None)["llm"]


@pytest.mark.parametrize(
    "params,match",
    [({"start_layer": -1}, "start_layer must be"), ({"start_layer": 3, "end_layer": 2}, "end_layer must be"),
     ({"r": -1}, "r must be"), ({"schedule": [1, -2]}, "schedule must be"), ({"final_tokens": 0}, "final_tokens must be"),
     ({"beta": 1.5}, "beta must be"), ({"epsilon": 0.0}, "epsilon must be"), ({"variant": "v2"}, "variant must be"),
     ({"positions": "x"}, "positions must be"), ({"final_ratio": 0}, "final_ratio must be"),
     ({"final_ratio": 1.5}, "final_ratio must be"), ({"final_ratio": True}, "final_ratio must be"),
     ({"final_ratio": "half"}, "final_ratio must be"),
     ({"final_ratio": 0.5, "final_tokens": 8}, "either final_ratio or final_tokens"),
     ({"final_ratio": 0.5, "schedule": [1, 1]}, "either final_ratio or schedule")],
)
def test_bad_params(params, match):
    with pytest.raises(MethodError, match=match) as e:
        methods.build("ficoco_l", params)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "params,match",
    [({"start_layer": 4}, "start_layer=4 must be <"), ({"start_layer": 1, "end_layer": 4}, "end_layer=4 must be <"),
     ({"start_layer": 1, "schedule": [1, 2]}, "schedule has 2 entries for 3 merge layers"),
     ({"start_layer": 1, "final_tokens": 65}, "exceeds the 64 visual tokens"),
     ({"start_layer": 1, "schedule": [30, 30, 4]}, "must leave >= 1")],
)
def test_validate_against_model(params, match):
    model, _ = tiny("llava", "llama")
    with pytest.raises(MethodError, match=match) as e:
        methods.build("ficoco_l", params).validate(get_adapter(model))
    assert "\n" not in str(e.value)


def test_config_file_builds():
    cfg = yaml.safe_load((ROOT / "conf/method/ficoco_l.yaml").read_text())
    m = methods.build(cfg["name"], cfg["params"])
    assert (m.name, m.variant, m.beta, m.gamma, m.epsilon) == ("ficoco_l", "paper", 0.6, 0.6, 0.998)
    assert m.final_ratio is None


def test_score_blocks_skip_only_invisible_keys():
    """Blocked head-mean attention == one softmax over every key, masked causally (float rounding: the
    softmax sums run over fewer, exactly-zero terms)."""
    g = torch.Generator().manual_seed(0)
    B, H, n, d, c0, v = 2, 4, 40, 8, 3, 30
    qh, kh = torch.randn(B, H, n, d, generator=g), torch.randn(B, H, n, d, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :2] = False  # left padding in sample 1
    vis = torch.arange(c0, c0 + v)[None].expand(B, -1)
    rows = torch.arange(c0, n)[None].expand(B, -1)  # visual rows, then text rows
    allowed = valid[:, None, :] & (torch.arange(n)[None, None] <= rows[..., None])
    full = LR.query_row_probs(qh[:, :, c0:], kh, allowed, 0.3).mean(1).gather(2, vis[:, None].expand(-1, n - c0, -1))
    old = FL.SCORE_BLOCK
    try:
        for block in (4, 7, 64):
            FL.SCORE_BLOCK = block
            got = FL.head_mean_attention(qh[:, :, c0:], kh, rows, valid, vis, 0.3)
            torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-7, msg=f"block {block}")
            assert torch.equal(got == 0, full == 0)  # the same entries are exactly masked
    finally:
        FL.SCORE_BLOCK = old
    assert FL.score_blocks(37, 30) == [(0, 30), (30, 37)]  # default block: all visual rows, the text rows
    # analytic: blocks of 128 visual rows against before + (block end) keys; the text rows against all keys
    assert FL.score_key_macs(1, 256, 10, 2) == 2 * (128 * 129 + 128 * 257 + 10 * 267)
