"""The ``flops`` part: wall time of ``vtbench-flops`` per method beside the import floor."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from harness.bench.setup import BUDGET_TOKENS, METHODS


class CountingPart:
    """The flops part of `Bench` (a mixin: the shared inputs are `Bench`'s)."""

    # flops -----------------------------------------------------------------------------------------------
    def _timed(self, cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
        """(wall s, user + system CPU s, result) of one subprocess."""
        import resource

        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), p

    def flops(self, names=METHODS, model: str = "llava15_13b", repeats: int = 3) -> dict:
        """Wall time of `vtbench-flops` per method (median of `repeats` runs), beside the import floor:
        the time of importing torch, transformers and the LLaVA / CLIP / Llama modeling code, which every
        count pays before any code of ours runs. The runs go round-robin (every method, then the floor,
        once per round, the order rotating), so that a slow stretch of the machine spreads over all of
        them instead of falling on one method's runs."""
        exe = Path(sys.executable).with_name("vtbench-flops")
        cmd0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "harness.cli.flops"]
        cmds = {name: cmd0 + [f"model={model}", f"method={name}"] + flops_cli_params(name) + ["format=json"]
                for name in names}
        cmds[FLOOR] = [sys.executable, "-c", IMPORT_FLOOR]
        order = list(cmds)
        runs: dict[str, list] = {n: [] for n in order}
        for r in range(repeats):
            k = r % len(order)
            for n in order[k:] + order[:k]:
                runs[n].append(self._timed(cmds[n]))
            self.log(f"flops round {r + 1}/{repeats}: " + ", ".join(f"{n} {runs[n][-1][0]:.1f}s" for n in order))
        floor = sorted(x[0] for x in runs.pop(FLOOR))
        rows = []
        for name in names:
            args = cmds[name][len(cmd0):-1]
            rs = sorted(runs[name], key=lambda x: x[0])
            wall, cpu_s, p = rs[len(rs) // 2]
            row = {"method": name, "args": " ".join(args), "seconds": round(wall, 2), "cpu_seconds": round(cpu_s, 2),
                   "seconds_all": [round(x[0], 2) for x in runs[name]], "rc": max(x[2].returncode for x in rs)}
            if p.returncode == 0:
                r = json.loads(p.stdout)
                row.update({"prefill_flops": r["prefill"]["total"]["counted"] or r["prefill"]["total"]["analytic"],
                            "source": r["prefill"]["source"], "match": r["prefill"]["total"]["match"],
                            "inner_seconds": r.get("seconds"), "timing": r.get("timing", {}),
                            "notes": r.get("notes", [])})
            else:
                row["error"] = (p.stderr.strip().splitlines() or [""])[-1]
            rows.append(row)
            self.log(f"flops: {name} {wall:.1f}s (runs {row['seconds_all']}) rc={row['rc']}")
        dense = next((r.get("prefill_flops") for r in rows if r["method"] == "none"), None)
        for r in rows:
            if dense and r.get("prefill_flops"):
                r["predicted_speedup"] = dense / r["prefill_flops"]
        return {"model": model, "rows": rows, "limit_s": 10.0, "repeats": repeats,
                "import_floor_s": round(floor[len(floor) // 2], 2), "import_floor_all": [round(x, 2) for x in floor],
                "import_floor_cmd": IMPORT_FLOOR,
                "all_under_limit": all(r["seconds"] < 10.0 and r["rc"] == 0 for r in rows),
                # user + system CPU time of the command: its wall time on an otherwise idle machine
                "all_cpu_under_limit": all(r.get("cpu_seconds", 1e9) < 10.0 and r["rc"] == 0 for r in rows)}


FLOOR = "(import floor)"
#: what every `vtbench-flops` run imports before any vtbench code runs (the floor of its wall time)
IMPORT_FLOOR = ("import torch, transformers; from transformers.models.llava import modeling_llava; "
                "from transformers.models.clip import modeling_clip; from transformers.models.llama import modeling_llama; "
                "import os; os._exit(0)")  # leaves as vtbench-flops does, without the interpreter's teardown


def flops_cli_params(name: str, n_vis: int = 576, num_layers: int = 40) -> list[str]:
    """`vtbench-flops` overrides for the common budget on a 13B-size config (192 of 576 tokens)."""
    k = int(round(BUDGET_TOKENS * n_vis))
    p = {
        "none": [], "random": [f"method.params.keep={k}"], "fastv": [f"method.params.keep={k}"],
        "tome": [f"method.params.tokens={k}"], "ficoco_v": [f"method.params.tokens={k}"],
        "ficoco_l": [f"method.params.final_tokens={k}"], "ficoco_vl": [f"method.params.tokens={k}"],
        "visionzip": [f"method.params.tokens={k}"], "vispruner": [f"method.params.tokens={k}"],
        "divprune": [f"method.params.keep={k}"],
        "shortv": [],  # the paper's 13B list (conf/model_method/llava15_13b_shortv.yaml)
        "redundancylens": [
            "method.params.hollow_layers=[" + ",".join(map(str, range(num_layers // 2, num_layers))) + "]",
            "method.params.ffn_layers=[" + ",".join(map(str, range(num_layers // 2, num_layers))) + "]",
        ],
    }
    return p[name]
