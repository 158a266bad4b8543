"""When a budget is not met: the one rule the run warns with and the report footnotes (`harness.budget` solves
budgets; this module stays light to import, so reading records needs no torch)."""
from __future__ import annotations

#: a FLOPs-matched budget is met when the closest setting's predicted ratio is within this of the target
BUDGET_TOLERANCE = 0.02


def budget_note(info: dict | None) -> str | None:
    """Why a budget was not met: a FLOPs-matched budget whose closest setting misses its target."""
    if not info or info.get("target_flops_ratio") is None or info.get("predicted_flops_ratio") is None:
        return None
    target, got = float(info["target_flops_ratio"]), float(info["predicted_flops_ratio"])
    if abs(got - target) <= BUDGET_TOLERANCE:
        return None
    knob = ", ".join(f"{k}={v}" for k, v in (info.get("knob") or {}).items())
    return f"target FLOPs ratio {target:.2f} not reachable, closest setting {knob} costs {got:.2f}"
