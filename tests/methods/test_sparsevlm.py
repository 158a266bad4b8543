"""SparseVLM: the documented no-op, a plain reference (loops, eager attention by hand: identical kept sets
and logits on LLaVA and M-RoPE Qwen2-VL), cached == uncached greedy decoding, a padded batch == single
prompts, the kept count on every sample, counted FLOPs == analytic on every family, the token budget at
the first drop and a FLOPs budget, parameter errors (one line, named key), the shipped configs."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import methods
from harness.budget import prompt_count
from harness.efficiency import analytic as A
from harness.efficiency import flops as F
from harness.models import get_adapter
from harness.models.tiny import build_tiny
from methods._shared import llm_reduce as LR
from methods._shared.context import get_context
from methods.base import MethodError
from tests.efficiency.helpers import image
from tests.methods.helpers import check_decode_consistency, forward, greedy_uncached, make_inputs, tiny

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = dict(methods.get("sparsevlm").example)
QWEN_SIZES = [(84, 56), (64, 64)]  # two images, 6 + 4 visual tokens, text between them


def apply(model, **params):
    m = methods.build("sparsevlm", params)
    m.apply(model, get_adapter(model))
    return model, m


# ---- the plain reference -------------------------------------------------------------------------------
def _capture_llm_input(model, inp):
    """The unpatched model's hidden states entering decoder layer 0 and its (cos, sin) for every token."""
    got = {}

    def pre(mod, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        got["pe"] = kwargs["position_embeddings"]

    layer0 = get_adapter(model).llm_layers[0]
    handle = layer0.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        forward(model, inp)
    finally:
        handle.remove()
    return got["h"][0], got["pe"][0][0], got["pe"][1][0]


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _layer_by_hand(layer, h, cos, sin):
    """One pre-norm decoder layer with eager attention written out per head; returns (output, probs per
    head [H, n, n])."""
    a = layer.self_attn
    n, hd = h.shape[0], a.head_dim
    x = layer.input_layernorm(h[None])[0]
    q = a.q_proj(x).view(n, -1, hd).transpose(0, 1)
    k = a.k_proj(x).view(n, -1, hd).transpose(0, 1)
    v = a.v_proj(x).view(n, -1, hd).transpose(0, 1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    H, Hkv = q.shape[0], k.shape[0]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    outs, probs = [], []
    for head in range(H):
        kv = head // (H // Hkv)
        s = (q[head] @ k[kv].T) * a.scaling
        p = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
        probs.append(p)
        outs.append(p @ v[kv])
    h = h + a.o_proj(torch.cat(outs, dim=-1))
    h = h + layer.mlp(layer.post_attention_layernorm(h[None])[0])
    return h, torch.stack(probs)


def _clusters(pruned):
    if pruned <= 0:
        return 0, 0
    cand = min(int(0.3 * pruned) + 1, pruned)
    return cand, min(cand // 10 + 1, cand)


def _dpc_by_loops(X, c):
    m, d = len(X), X[0].shape[0]
    dist = [[float((X[i] - X[j]).norm()) / math.sqrt(d) if i != j else 0.0 for j in range(m)] for i in range(m)]
    dens = [math.exp(-sum(t * t for t in sorted(dist[i])[:c]) / c) for i in range(m)]
    big = max(max(r) for r in dist)
    delta = []
    for i in range(m):
        denser = [j for j in range(m) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        delta.append(min(dist[i][j] for j in denser) if denser else big)
    centres = sorted(range(m), key=lambda i: (-(delta[i] * dens[i]), i))[:c]
    assign = [min(range(c), key=lambda ci: (dist[i][centres[ci]], ci)) for i in range(m)]
    for ci, i in enumerate(centres):
        assign[i] = ci
    return centres, assign


def reference(model, inp, layers, targets=None, keep=None, lam=None, recycle=True):
    """SparseVLM on one prompt written plainly: returns (last-token logits, kept prefill indices after
    each stage). `targets`: visual tokens after each stage (recycled included); `keep`: top-k per stage;
    `lam`: the rank mode."""
    h, cos, sin = _capture_llm_input(model, inp)
    h = h.clone()
    ids = inp["input_ids"][0].tolist()
    P = len(ids)
    visual = [t == model.config.image_token_id for t in ids]
    first = visual.index(True)
    text = [i for i in range(P) if not visual[i] and i > first]
    V = [i for i in range(P) if visual[i]]
    # raters: mean over visual rows of the softmax over text columns of h_v . h_t
    m = [0.0] * len(text)
    for v in V:
        row = [float(h[v] @ h[t]) for t in text]
        top = max(row)
        e = [math.exp(x - top) for x in row]
        for j in range(len(text)):
            m[j] += e[j] / sum(e) / len(V)
    mean = sum(m) / len(m)
    raters = {t for t, mj in zip(text, m) if mj > mean}
    alive = list(range(P))
    stages = []
    layers_ = get_adapter(model).llm_layers
    with torch.no_grad():
        for li, layer in enumerate(layers_):
            h, probs = _layer_by_hand(layer, h, cos[alive], sin[alive])
            if li not in layers:
                continue
            s = layers.index(li)
            cur_vis = [j for j, i in enumerate(alive) if visual[i]]
            nv = len(cur_vis)
            A = probs.mean(0)
            rrows = [j for j, i in enumerate(alive) if i in raters]
            score = [sum(float(A[r, c]) for r in rrows) / len(rrows) for c in cur_vis]
            if lam is not None:
                Pm = torch.stack([A[r, cur_vis] for r in rrows]).float()
                N = math.floor(lam * (nv - int(torch.linalg.matrix_rank(Pm))))
                k = nv - min(max(N, 0), nv - 1)
            elif keep is not None:
                k = keep[s]
            else:
                k = targets[s]
                while k > 0 and k + (_clusters(nv - k)[1] if recycle else 0) > targets[s]:
                    k -= 1
                if k < nv and recycle:  # a target below the clusters at k = 0: that many clusters
                    n_clu_cap = targets[s] - k
            if k >= nv:
                stages.append(list(alive))
                continue
            order = sorted(range(nv), key=lambda v: (-score[v], v))
            kept = set(order[:k])
            n_cand, n_clu = _clusters(nv - k) if recycle else (0, 0)
            if targets is not None and recycle:
                n_clu = min(n_clu, n_clu_cap)
            if n_clu:
                cand = order[k : k + n_cand]
                X = [h[cur_vis[v]].double() for v in cand]
                centres, assign = _dpc_by_loops(X, n_clu)
                for ci, c in enumerate(centres):
                    members = [X[i] for i in range(len(cand)) if assign[i] == ci]
                    h[cur_vis[cand[c]]] = (sum(members) / len(members)).to(h.dtype)
                    kept.add(cand[c])
            keep_cols = [j for j, i in enumerate(alive) if not visual[i] or cur_vis.index(j) in kept]
            alive = [alive[j] for j in keep_cols]
            h = h[keep_cols]
            stages.append(list(alive))
        lm = get_adapter(model).language_model
        logits = model.lm_head(lm.norm(h[None])[0])[-1]
    return logits, stages


def patched_stages(model, layers):
    st = LR.get_reducer(model).state
    return [st.cache_idx[l + 1][0].tolist() for l in layers]


_slow = pytest.mark.slow
REF_CASES = [
    ("llava", "llama", False, {"layers": [0, 1, 2], "keep_ratio": 0.5}, (0, 3)),
    pytest.param("llava", "llama", False, {"layers": [0, 1, 2], "keep_ratio": 0.5}, (1, 2), marks=_slow),
    ("llava", "qwen2", True, {"layers": [0, 1, 2], "keep_ratio": 0.5}, (1,)),
    pytest.param("llava", "mistral", True, {"layers": [1, 2], "keep": [40, 9], "schedule": [1.0, 0.5]}, (2,),
                 marks=_slow),
    pytest.param("llava", "llama", True, {"layers": [0, 2], "tokens": 20, "schedule": [1.0, 0.5], "recycle": False},
                 (0,), marks=_slow),
    ("llava", "llama", True, {"layers": [0, 1, 2], "mode": "rank", "lam": 0.5}, (1,)),
    pytest.param("llava", "llama", True, {"layers": [0, 1, 2], "mode": "rank", "lam": 0.3}, (0, 2), marks=_slow),
]


@pytest.mark.parametrize("family,lm,gqa,params,samples", REF_CASES)
def test_equals_plain_reference(family, lm, gqa, params, samples):
    """Identical kept sets at every stage and the same logits as the plain reference (SDPA model vs
    eager attention by hand)."""
    base, proc = tiny(family, lm, gqa=gqa)
    model, m = apply(copy.deepcopy(base), **params)
    for i in samples:
        inp = make_inputs(proc, (i,))
        got = forward(model, inp).logits[0, -1]
        kw = {}
        if m.mode == "rank":
            kw["lam"] = m.lam
        elif m.keep is not None:
            kw["keep"] = m.keep
        else:
            kw["targets"] = [after for _, _, after in m.stage_plan(64)]
        ref, stages = reference(base, inp, m.layers, recycle=m.recycle, **kw)
        assert patched_stages(model, m.layers) == stages
        assert (got - ref).abs().max() < 1e-5  # measured: <= 2.4e-7 (float32)
        assert len(stages[-1]) < inp["input_ids"].shape[1]  # it really dropped


@pytest.mark.parametrize("family", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=_slow)])
def test_equals_plain_reference_on_mrope(family):
    """M-RoPE: the reference indexes the unpatched model's per-token cos/sin (built from the three position
    streams) with the kept tokens: the patched model keeps every token's (t, h, w) positions."""
    base, proc = build_tiny(family, gqa=True, vision_layers=3)
    model, m = apply(copy.deepcopy(base), layers=[0, 1], keep=[6, 3], schedule=[1.0, 1.0])
    content = [{"type": "image"}] * 2 + [{"type": "text", "text": "How many circles are there?"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inp = proc(images=[image(i, s) for i, s in enumerate(QWEN_SIZES)], text=[text], return_tensors="pt")
    got = forward(model, inp).logits[0, -1]
    ref, stages = reference(base, inp, [0, 1], keep=[6, 3])
    assert patched_stages(model, [0, 1]) == stages
    assert (got - ref).abs().max() < 1e-5


# ---- the shared properties -------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [dict(methods.get("sparsevlm").noop), {"keep_ratio": 1.0, "schedule": [1.0, 1.0, 1.0],
                                                                           "layers": [0, 1, 2]}])
def test_documented_noop_gives_identical_logits(params):
    base, proc = tiny("llava", "llama", gqa=True)
    inp = make_inputs(proc, (0, 1, 2, 3))
    model, _ = apply(copy.deepcopy(base), **params)
    assert LR.get_reducer(model) is None
    assert torch.equal(forward(model, inp).logits, forward(base, inp).logits)


def test_example_really_reduces_and_caches_the_kept_tokens():
    model, proc = tiny("llava", "llama")
    _, m = apply(model, **EXAMPLE)
    inp = make_inputs(proc, (1,))
    P = inp["input_ids"].shape[1]
    out = forward(model, inp, use_cache=True)
    ctx = get_context(model)
    assert ctx.visual_tokens_per_layer == [64, 32, 21, 12]
    assert ctx.visual_tokens_final == 32 == m.visual_tokens_kept(F.layouts_from_inputs(model, inp)[0])
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [P, P - 32, P - 43, P - 52]
    assert model.config.text_config._attn_implementation == "sdpa"  # SDPA kept; scores computed aside


def test_recycling_is_logged_for_recall():
    """`ReduceState.merges` (read by harness.recall): per stage, targets = the kept visual tokens, every
    recycled member has weight 1 on exactly one centre (a target), the other deleted tokens none; a
    centre's cluster size matches the tokens merged into its row."""
    model, proc = tiny("llava", "llama")
    _, m = apply(model, **EXAMPLE)
    forward(model, make_inputs(proc, (0, 1)))
    merges = LR.get_reducer(model).state.merges
    assert sorted(merges) == list(m.layers)
    for (before, k, after), layer in zip(m.stage_plan(64), m.layers):
        disc, tgt, alpha = merges[layer]
        assert tgt.shape[1] == after and disc.shape[1] == before - after
        for b in range(2):
            assert sorted(disc[b].tolist() + tgt[b].tolist()) == list(range(before))
        n_cand = int(0.3 * (before - k)) + 1
        rows = alpha.sum(2)
        assert bool(((rows == 0) | (rows == 1)).all())
        assert rows.sum(1).tolist() == [n_cand - (after - k)] * 2  # members other than the centres


def test_kept_count_per_sample_in_a_padded_batch():
    model, proc = tiny("llava", "qwen2", gqa=True)
    apply(model, **EXAMPLE)
    inp = make_inputs(proc, (0, 1, 2, 3))
    assert int((inp["attention_mask"] == 0).sum()) > 0
    forward(model, inp)
    st = LR.get_reducer(model).state
    for layer, expected in [(1, 32), (2, 21), (3, 12)]:
        idx = st.cache_idx[layer]
        assert st.visual.gather(1, idx).sum(1).tolist() == [expected] * 4


def test_cached_equals_uncached_and_batch_equals_single_llava():
    model, proc = tiny("llava", "llama", gqa=True)
    apply(model, **EXAMPLE)
    check_decode_consistency(model, proc, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("family,lm", [("llava", "mistral"), ("llava_next", "qwen2")])
def test_cached_equals_uncached_and_batch_equals_single_more(family, lm):
    model, proc = tiny(family, lm, gqa=True)
    apply(model, **EXAMPLE)
    size = (128, 64) if family == "llava_next" else (64, 64)
    check_decode_consistency(model, proc, steps=2, size=size)


def _qwen_batch(proc, texts, first=0):
    """Prompts with two images (seeds 7 * (first + b) + i) and the texts; batch > 1 left padded."""
    def prompt(t):
        content = [{"type": "image"}] * 2 + [{"type": "text", "text": t}]
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    imgs = [image(7 * (first + b) + i, s) for b in range(len(texts)) for i, s in enumerate(QWEN_SIZES)]
    return proc(images=imgs, text=[prompt(t) for t in texts], return_tensors="pt", padding=len(texts) > 1)


@pytest.mark.parametrize("family", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=_slow),
                                    pytest.param("llava_onevision", marks=_slow)])
def test_new_families_cached_uncached_batch_single_flops(family):
    model, proc = build_tiny(family, gqa=True, vision_layers=3)
    _, m = apply(model, layers=[0, 1, 2], tokens=6, schedule=[1.0, 0.7, 0.4])
    texts = ["What is shown?", "How many circles squares triangles stars are there? Answer with one word."]
    inp = _qwen_batch(proc, texts)
    assert not bool(inp["attention_mask"].all())
    with torch.no_grad():
        both = model.generate(**inp, max_new_tokens=3, do_sample=False)[:, inp["input_ids"].shape[1]:]
    assert torch.equal(both, greedy_uncached(model, inp, 3))
    for b, t in enumerate(texts):
        one = _qwen_batch(proc, [t], first=b)
        with torch.no_grad():
            single = model.generate(**one, max_new_tokens=3, do_sample=False)[:, one["input_ids"].shape[1]:]
        assert torch.equal(both[b], single[0])
    one = _qwen_batch(proc, texts[:1])
    (layout,) = F.layouts_from_inputs(model, one)
    counted = F.count_prefill(model, one)
    assert counted.flops == F.analytic_prefill(model.config, layout, m)
    assert get_context(model).visual_tokens_final == 6 == m.visual_tokens_kept(layout)
    assert counted.total < sum(F.analytic_prefill(model.config, layout).values())


@pytest.mark.parametrize("family,lm,params", [
    ("llava", "qwen2", {"layers": [1, 2], "keep": [30, 10]}),
    pytest.param("llava", "llama", EXAMPLE, marks=_slow),
    pytest.param("llava", "mistral", {"layers": [0, 2], "keep_ratio": 0.25, "recycle": False}, marks=_slow),
    pytest.param("llava_next", "llama", {"layers": [0, 1, 2], "tokens": 60}, marks=_slow),
])
def test_counted_flops_equal_analytic(family, lm, params):
    model, proc = tiny(family, lm, gqa=True)
    _, m = apply(model, **params)
    inp = make_inputs(proc, (1,), size=(128, 64) if family == "llava_next" else (64, 64))
    (layout,) = F.layouts_from_inputs(model, inp)
    counted = F.count_prefill(model, inp).flops
    assert counted == F.analytic_prefill(model.config, layout, m)
    assert counted["llm"] < F.analytic_prefill(model.config, layout)["llm"]
    per_layer, _ = m.llm_visual_schedule(A.ModelShapes.from_config(model.config), layout)
    assert per_layer == get_context(model).visual_tokens_per_layer  # the schedule the model ran


# ---- budgets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.33, 20, pytest.param(0.5, marks=_slow), pytest.param(3, marks=_slow)])
def test_token_budget_is_the_count_at_the_first_drop(value):
    model, proc = tiny("llava", "llama")
    m0 = methods.build("sparsevlm", {"layers": [0, 1, 2]})
    m = methods.build("sparsevlm", dict(m0.params(), **m0.budget_token_params(value)))
    m.apply(model, get_adapter(model))
    inp = make_inputs(proc, (2,))
    forward(model, inp)
    layout = F.layouts_from_inputs(model, inp)[0]
    ctx = get_context(model)
    assert ctx.visual_tokens_final == m.visual_tokens_kept(layout) == prompt_count(value, 64)
    assert ctx.visual_tokens_per_layer[1] == prompt_count(value, 64)
    assert ctx.visual_tokens_per_layer[-1] <= ctx.visual_tokens_per_layer[1]


def test_flops_budget_solves_the_first_stage_count():
    from harness import budget as B

    model, _ = tiny("llava", "llama")
    m0 = methods.build("sparsevlm", {"layers": [0, 1, 2]})
    m, info = B.resolve(m0, get_adapter(model), {"kind": "flops", "value": 0.85})
    assert m.mode == "fixed" and m.tokens == info["knob"]["tokens"] and m.keep_ratio is None
    assert 1 <= m.tokens < 64 and abs(info["predicted_flops_ratio"] - 0.85) < 0.01
    # the solution's neighbours are no closer to the target
    for t in (m.tokens - 1, m.tokens + 1):
        n = methods.build("sparsevlm", dict(m.params(), tokens=t))
        layout = B.layout_for(get_adapter(model), 64)
        r = sum(F.analytic_prefill(model.config, layout, n).values()) / sum(F.analytic_prefill(model.config, layout).values())
        assert abs(r - 0.85) >= abs(info["predicted_flops_ratio"] - 0.85)


def test_stage_counts_and_recycling_rule():
    """The v1.5 lists on LLaVA-1.5-7B (576 tokens): 300 kept + 9 recycled (83 candidates), then 200 + 4,
    then 110 + 4; a total target is met exactly."""
    m = methods.build("sparsevlm", {"keep": [300, 200, 110]})
    assert m.stage_plan(576) == [(576, 300, 309), (309, 200, 204), (204, 110, 113)]
    for target in range(1, 576):
        m = methods.build("sparsevlm", {"tokens": target, "schedule": [1.0, 1.0, 1.0]})
        before, k, after = m.stage_plan(576)[0]
        assert after == target and (k == 0 or after - k == (int(0.3 * (576 - k)) + 1) // 10 + 1)
    assert methods.build("sparsevlm", {"tokens": 576}).stage_plan(576)[0] == (576, None, 576)  # nothing to do


# ---- errors and configs ----------------------------------------------------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize("params,key", [
    ({"layers": []}, "layers"), ({"layers": [2, 2]}, "layers"), ({"layers": [-1, 3]}, "layers"),
    ({"layers": "2,6"}, "layers"), ({"layers": [2.5]}, "layers"), ({"layers": [True]}, "layers"),
    ({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"keep_ratio": float("nan")}, "keep_ratio"), ({"keep_ratio": float("inf")}, "keep_ratio"),
    ({"keep_ratio": "half"}, "keep_ratio"), ({"keep_ratio": None, "tokens": 0}, "tokens"),
    ({"keep_ratio": None, "tokens": 2.5}, "tokens"), ({"keep_ratio": None, "tokens": True}, "tokens"),
    ({"keep": [300, 200]}, "keep"), ({"keep": [100, 200, 50]}, "keep"), ({"keep": [300, 0, 10]}, "keep"),
    ({"keep": [300, 200, 100], "tokens": 100}, "keep"), ({"keep_ratio": None}, "keep_ratio"),
    ({"mode": "rank", "tokens": 100}, "tokens"),
    ({"schedule": [1.0, 0.5]}, "schedule"), ({"schedule": [0.9, 0.5, 0.2]}, "schedule"),
    ({"schedule": [1.0, 0.5, 0.7]}, "schedule"), ({"schedule": [1.0, float("nan"), 0.2]}, "schedule"),
    ({"mode": "adaptive"}, "mode"),
    ({"mode": "rank", "lam": 0.0}, "lam"), ({"mode": "rank", "lam": float("inf")}, "lam"),
    ({"recycle": "yes"}, "recycle"), ({"recycle_share": 1.5}, "recycle_share"), ({"recycle_share": -0.1}, "recycle_share"),
    ({"cluster_size": 0}, "cluster_size"), ({"cluster_size": 2.5}, "cluster_size"),
    ({"foo": 1}, "foo"),
])
def test_bad_params_one_line(params, key):
    with pytest.raises(MethodError) as e:
        methods.build("sparsevlm", params)
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg


@pytest.mark.slow
@pytest.mark.bad_input
def test_bad_params_exit_2_before_load(tmp_path):
    """The console script refuses a bad parameter in one line with exit status 2, before loading a model."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "harness.cli", "model=tiny", "method=sparsevlm",
                        "method.params.keep_ratio=nan", f"store.dir={tmp_path}/store", "logger=none"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "keep_ratio" in lines[0], r.stderr
    assert not (tmp_path / "store").exists()


def test_validate_against_model_one_line():
    model, _ = tiny("llava", "llama")
    with pytest.raises(MethodError, match="leaves no layer") as e:
        methods.build("sparsevlm", {"layers": [1, 3]}).validate(get_adapter(model))
    assert "\n" not in str(e.value)


def test_rank_mode_has_no_analytic_count():
    m = methods.build("sparsevlm", {"mode": "rank"})
    with pytest.raises(MethodError, match="rank"):
        m.visual_tokens_kept(A.TokenLayout(before=1, visual=576, after=63))
    with pytest.raises(MethodError, match="rank"):
        m.llm_visual_schedule(None, A.TokenLayout(before=1, visual=576, after=63))


def test_config_files_build():
    cfg = yaml.safe_load((ROOT / "conf/method/sparsevlm.yaml").read_text())
    m = methods.build(cfg["name"], cfg["params"])
    assert (m.layers, m.mode, m.keep_ratio, m.shares()) == ([2, 6, 15], "fixed", 0.333, [1.0, 0.6667, 0.3667])
    paper = yaml.safe_load((ROOT / "conf/method/sparsevlm_paper.yaml").read_text())
    p = methods.build(paper["name"], paper["params"])
    assert p.keep == [300, 200, 110] and p.recycle
    tiny_cfg = OmegaConf.load(ROOT / "conf/model_method/tiny_sparsevlm.yaml")
    t = methods.build("sparsevlm", dict(cfg["params"], **OmegaConf.to_container(tiny_cfg.params)))
    assert max(t.layers) + 1 < 8
    rec = OmegaConf.load(ROOT / "conf/experiment/repro_sparsevlm_llava15_7b.yaml")
    assert {"override /method": "sparsevlm_paper"} in OmegaConf.to_container(rec.defaults)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = OverridesParser.create().parse_overrides([f"k={rec.hydra.sweeper.params['method.params.keep']}"])[0]
    lists = list(sweep.sweep_iterator())
    assert lists == [[300, 200, 110], [303, 110, 36], [66, 30, 17]]
    for keep in lists:
        methods.build("sparsevlm", dict(paper["params"], keep=keep))


@pytest.mark.bad_input
@pytest.mark.parametrize("extra, why", [
    ([], "run.efficiency.enabled=false"),  # no analytic FLOPs for the probe's counted == analytic check
    (["run.efficiency.enabled=false", "run.batch_size=4"], "run.batch_size=1"),  # counts differ per prompt
])
def test_rank_mode_is_refused_at_validation_where_it_cannot_run(extra, why, tmp_path, capsys):
    """`mode=rank` with the efficiency probe or a batch > 1 is bad input before the model loads (one line,
    exit 2, nothing written); at batch 1 without the probe it validates."""
    from harness.cli.main import main
    from harness.config import compose_config, validate

    store = tmp_path / "store"
    rc = main(["method=sparsevlm", "method.params.mode=rank", "method.params.keep_ratio=null", "logger=none",
               f"store.dir={store}", *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("vtbench: error: method.params.mode=rank:"), err
    assert why in err[0] and not store.exists()
    validate(compose_config(["method=sparsevlm", "method.params.mode=rank", "method.params.keep_ratio=null",
                             "run.efficiency.enabled=false", "run.batch_size=1"]))
