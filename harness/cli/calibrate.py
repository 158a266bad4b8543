"""`vtbench-calibrate`: compute (or reuse) the calibration artefacts of ShortV and RedundancyLens
(`harness.calibration`).

    vtbench-calibrate method=shortv [model=tiny] [calibration.benchmark=shapes] [calibration.n=40]
    vtbench-calibrate method=redundancylens [calibration.n=40] [calibration.seed=0]
"""
from __future__ import annotations

import sys

from harness import calibration


def main(argv: list[str] | None = None) -> int:
    from harness.cli.common import run_script

    return run_script("vtbench-calibrate", _main, argv,
                      interrupt_note="finished artefacts are kept; rerun the same command to compute the rest")


def _main(argv: list[str] | None = None) -> int:
    from harness.config import ConfigError, compose_config, validate
    from harness.models.checkpoint import check_available
    from harness.models.loading import load_model

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):  # Hydra-style overrides; --help is the usage
        print(__doc__)
        return 0
    cfg = compose_config(argv)
    method = validate(cfg)
    if method.name not in ("shortv", "redundancylens"):
        raise ConfigError(f"method={method.name}: method {method.name!r} needs no calibration (shortv, redundancylens do)")
    check_available(cfg.model)
    model, processor, adapter = load_model(cfg.model, cfg.run.device, cfg.run.dtype)
    if method.name == "shortv":
        arts = calibration.shortv_artefacts(cfg, model, processor, adapter)
    else:
        arts = calibration.redundancylens_artefacts(cfg, model, processor, adapter, method)
    for kind, art in arts.items():
        print(f"{method.name} {kind}: ranking (least effective first) {art['ranking']}")
        if method.name == "shortv":
            print("  LC per layer: " + " ".join(f"{i}:{s:.3g}" for i, s in enumerate(art["scores"])))
        print(f"  artefact: {art['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
