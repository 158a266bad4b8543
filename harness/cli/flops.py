"""`vtbench-flops`: FLOPs of a model x method, per component, without loading weights.

    vtbench-flops model=llava15_7b method=none [method.params.X=...] [text_tokens=64]
                  [image=672x672] [format=table|json] [convention=full|shortv|fastv|ficoco|divprune]

The architecture is built on the meta device (no memory for weights), the method is applied to it and
one prefill plus one decode step are *counted* with torch's FLOP formulas (`source: counted`); next to
it the analytic formula (the method's `analytic_prefill_macs`). A method whose code reads tensor values
(`Method.meta_countable` is False: the LLM-side methods find the visual tokens in `input_ids`) cannot run
on the meta device; it is not tried, and the analytic numbers are reported with `source: analytic`.
(On real tiny models every method is counted; tests check counted == analytic there.) The prompt is
synthetic: 1 token (BOS) before the image, the image tokens the processor would insert for an `image`
of that size, `text_tokens - 1` tokens after it.
"""
from __future__ import annotations

import json
import sys
from typing import Any

OWN_KEYS = {"text_tokens": "64", "format": "table", "convention": "full", "image": None}
FORMATS = ("table", "json")


def _split_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    own = dict(OWN_KEYS)
    rest = []
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        elif a in ("-h", "--help"):  # the usage on stdout, exit 0 (as every vtbench script)
            print(__doc__)
            raise SystemExit(0)
        else:
            rest.append(a)
    return own, rest


def _parse_own(own: dict) -> dict:
    from harness.efficiency import flops_table
    from harness.efficiency.conventions import CONVENTIONS

    try:
        text = int(own["text_tokens"])
    except ValueError:
        raise flops_table.CliError(f"text_tokens={own['text_tokens']}: text_tokens must be an integer >= 1") from None
    if text < 1:
        raise flops_table.CliError(f"text_tokens={text}: text_tokens must be an integer >= 1")
    if own["format"] not in FORMATS:
        raise flops_table.CliError(f"format={own['format']}: format must be one of {', '.join(FORMATS)}")
    if own["convention"] not in CONVENTIONS:
        raise flops_table.CliError(f"convention={own['convention']}: convention must be one of {', '.join(CONVENTIONS)}")
    image = None
    if own["image"]:
        try:
            h, w = (int(x) for x in own["image"].lower().split("x"))
            assert h > 0 and w > 0
            image = (h, w)
        except Exception:
            raise flops_table.CliError(f"image={own['image']}: image must be HEIGHTxWIDTH with positive sizes, e.g. 672x672") from None
    return {"text_tokens": text, "format": own["format"], "convention": own["convention"], "image": image}


def main(argv: list[str] | None = None) -> int:
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from harness.efficiency import flops_table
    from harness.errors import EXIT_BAD_INPUT, install_signal_handlers, interrupted

    install_signal_handlers("vtbench-flops")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        own, rest = _split_args(argv)
        opts = _parse_own(own)
        result = flops_table.compute(rest, text_tokens=opts["text_tokens"], convention=opts["convention"], image=opts["image"])
    except flops_table.CliError as e:
        print(f"vtbench-flops: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        return interrupted("vtbench-flops", e, "nothing was written")
    if opts["format"] == "json":
        print(json.dumps(result, indent=2))
    else:
        print(flops_table.render_table(result))
    return 0


def script() -> None:  # pragma: no cover - the console script `vtbench-flops`
    """`main`, then exit without the interpreter's teardown.

    Freeing torch's and transformers' modules at interpreter exit takes about a second, longer than a
    meta-device count; the tool writes nothing but stdout, so after the exit handlers and a flush it
    leaves with `os._exit`.
    """
    import atexit
    import os

    rc = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":  # pragma: no cover
    script()
