"""`vtbench-paper`: the papers' FLOPs tables and the motivating figures (`harness.paper`)."""
from __future__ import annotations

import sys
from pathlib import Path

from harness import paper


def main(argv: list[str] | None = None) -> int:
    from harness.cli.common import run_script

    return run_script("vtbench-paper", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    import os

    from harness.cli.common import (ArgumentParser, choices_list, creatable_dir, default_store, existing_dir,
                                    non_negative_int, nonempty, positive_int)

    ap = ArgumentParser(prog="vtbench-paper", description=paper.__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/paper", type=creatable_dir)
    ap.add_argument("--part", choices=("flops", "figures", "all"), default="all")
    ap.add_argument("--model", default="tiny", type=nonempty, help="model config for the figures (conf/model/<name>.yaml)")
    ap.add_argument("--model-override", action="append", default=[], type=nonempty, metavar="KEY=VALUE",
                    help="extra vtbench overrides for the figure model, e.g. model.pretrained=DIR")
    ap.add_argument("--store", default=None, type=existing_dir,
                    help="results store of the FiCoCo figure (default: $VTBENCH_STORE or runs/store)")
    ap.add_argument("--samples", type=positive_int, default=8)
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads for the figures (tiny models: 1 is fastest)")
    ap.add_argument("--figures", default="lc,attention,ficoco,redundancylens",
                    type=choices_list(("lc", "attention", "ficoco", "redundancylens")),
                    help="comma list of figures (lc, attention, ficoco, redundancylens)")
    args = ap.parse_args(argv)
    args.store = args.store or default_store(must_exist=False)
    if args.part in ("figures", "all"):  # the figure model's overrides, checked as `vtbench` does, before writing
        from harness.config import validate

        validate(paper.load_cfg(args.model, args.model_override))
    out = Path(args.out)
    written = []
    if args.part in ("flops", "all"):
        written += paper.write_flops(out)
    if args.part in ("figures", "all"):
        import torch

        from harness.errors import bad_input_errors

        torch.set_num_threads(args.threads)
        try:
            written += paper.write_figures(out, args.model, args.model_override, args.store, args.samples, args.seed,
                                     tuple(args.figures))
        except bad_input_errors() as e:
            print(f"vtbench-paper: error: {e}", file=sys.stderr)
            return 2
    for p in written:
        print(p)
    print(f"[vtbench-paper] wrote {len(written)} files under {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
