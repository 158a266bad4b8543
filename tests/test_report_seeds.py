"""Report: cells that differ only in a method's seed are pooled into one row (mean accuracy, n seeds,
min–max, sd) whose 95 % interval adds the between-seed variance to the documents' sampling variance;
checked against a plain reference computed here with loops."""
import math

import pytest

from harness.report import build_tables, seed_pooled_interval, split_seed, write_outputs
from harness.results import ResultsStore
from tests.records import make_record

NONE = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
SEEDS = {0: [1, 0, 1, 0, 1, 0, 0, 1, 1, 0], 1: [1, 1, 0, 0, 1, 1, 0, 0, 1, 0], 2: [0, 0, 1, 0, 1, 0, 0, 0, 1, 0]}


def plain_interval(rows, base=None):
    """Plain reference: mean ± 1.96 sqrt(var over documents of the seed-averaged score / n + var of the
    per-seed means / S), sample variances (n - 1, S - 1)."""
    S, n = len(rows), len(rows[0])
    x = [[rows[s][d] - (base[d] if base else 0) for d in range(n)] for s in range(S)]
    per_seed = [sum(r) / n for r in x]
    per_doc = [sum(x[s][d] for s in range(S)) / S for d in range(n)]
    m = sum(per_seed) / S
    vd = sum((v - m) ** 2 for v in per_doc) / (n - 1) / n
    vs = sum((v - m) ** 2 for v in per_seed) / (S - 1) / S
    h = 1.96 * math.sqrt(vd + vs)
    return m, m - h, m + h


def store_with_seeds(tmp_path, extra=()):
    store = ResultsStore(tmp_path / "store")
    store.write(make_record("none", NONE, flops=4e9))
    for seed, sc in SEEDS.items():
        store.write(make_record("random", sc, [str(v) for v in sc], params={"keep_ratio": 0.25, "seed": seed},
                                flops=2e9 + seed))
    for rec in extra:
        store.write(rec)
    return str(tmp_path / "store")


def test_split_seed_at_any_depth():
    assert split_seed({"keep": 3, "seed": 2}) == ({"keep": 3}, (("seed", 2),))
    comp = {"members": [{"name": "random", "params": {"seed": 1}}, {"name": "fastv", "params": {"K": 2}}]}
    assert split_seed(comp) == ({"members": [{"name": "random", "params": {}}, {"name": "fastv", "params": {"K": 2}}]},
                                (("members.0.params.seed", 1),))
    assert split_seed({"K": 2}) == ({"K": 2}, ())


def test_interval_matches_plain_reference_and_widens_with_seed_variance():
    rows = [SEEDS[s] for s in (0, 1, 2)]
    got = seed_pooled_interval(rows)
    ref = plain_interval(rows)
    assert got["mean"] == pytest.approx(ref[0]) and got["low"] == pytest.approx(ref[1]) and got["high"] == pytest.approx(ref[2])
    d = seed_pooled_interval(rows, NONE)
    ref = plain_interval(rows, NONE)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx(ref)
    # the same per-document averages, seeds that agree vs seeds shifted by -0.1, 0, +0.1: the documents'
    # term is equal, the seed term is 0 vs 0.01 / 3, and the interval widens accordingly
    x = [float(v) for v in SEEDS[0]]
    same = seed_pooled_interval([x] * 3)
    shifted = seed_pooled_interval([[v + dv for v in x] for dv in (-0.1, 0.0, 0.1)])
    assert same["var_seeds"] == 0 and shifted["var_seeds"] == pytest.approx(0.01 / 3)
    assert same["var_docs"] == pytest.approx(shifted["var_docs"])
    assert shifted["high"] - shifted["low"] == pytest.approx(2 * 1.96 * math.sqrt(same["var_docs"] + 0.01 / 3))


def test_seeds_pooled_into_one_row(tmp_path):
    other = make_record("random", [1] * 10, params={"keep_ratio": 0.5, "seed": 0}, flops=3e9)  # another setting
    tables, _ = build_tables(store_with_seeds(tmp_path, [other]))
    (t,) = tables.values()
    rnd = t[t["method"] == "random"]
    assert len(rnd) == 2  # 3 seeds pooled at keep_ratio 0.25; keep_ratio 0.5 (one seed) stays a row
    pooled = rnd[rnd["params"].str.contains("seed=0,1,2")].iloc[0]
    accs = [sum(v) / 10 for v in SEEDS.values()]
    assert pooled["accuracy"] == pytest.approx(sum(accs) / 3)
    sd = math.sqrt(sum((a - sum(accs) / 3) ** 2 for a in accs) / 2)
    assert pooled["seed_spread"] == f"3: {min(accs):.3f}–{max(accs):.3f} (sd {sd:.3f})"
    m, lo, hi = plain_interval([SEEDS[s] for s in (0, 1, 2)])
    assert (pooled["acc_ci_low"], pooled["acc_ci_high"]) == pytest.approx((lo, hi))
    m, lo, hi = plain_interval([SEEDS[s] for s in (0, 1, 2)], NONE)
    assert pooled["diff_ci"] == f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    assert pooled["retention"] == pytest.approx(sum(accs) / 3 / 0.8)
    assert pooled["gflops"] == pytest.approx(2.000000001)  # efficiency columns: the seeds' mean
    assert pooled["key"].count("+") == 2
    single = rnd[~rnd["params"].str.contains("seed=")].iloc[0]
    assert single["accuracy"] == 1.0 and single["seed_spread"] != single["seed_spread"]  # NaN: not pooled
    write_outputs(tables, str(tmp_path / "out"), formats=("md",), figures=False)
    md = (tmp_path / "out" / "tables" / "tiny_shapes.md").read_text()
    assert "over seeds: n, min–max (sd)" in md and "s²_seeds/S" in md and f"3: {min(accs):.3f}–{max(accs):.3f}" in md


def test_without_several_seeds_nothing_is_pooled(tmp_path):
    store = ResultsStore(tmp_path / "store")
    store.write(make_record("none", NONE, flops=4e9))
    store.write(make_record("random", SEEDS[0], params={"keep_ratio": 0.25, "seed": 0}, flops=2e9))
    store.write(make_record("fastv", SEEDS[1], params={"K": 2}, flops=2e9))
    (t,) = build_tables(str(tmp_path / "store"))[0].values()
    assert len(t) == 3 and "seed_spread" not in t.columns
