"""The one checkpoint check: is a local checkpoint folder whole and consistent with itself, read from its
files before any weights load?

`check_checkpoint(model_cfg)` runs for a single cell before "Loading weights" and, in a sweep, for every
distinct checkpoint before the first cell. Every failure is bad input (`ModelLoadError`): one line naming
the checkpoint, the file and what disagrees. In this order:

1. every JSON file that affects outputs parses strictly (a truncated `tokenizer.json` is named);
2. the safetensors files are complete (headers against file sizes, `loading.check_safetensors`);
3. `config.json` is read, and the tensors named in the safetensors headers are compared with the
   architecture it describes, built on the meta device (no memory): layer counts per stack, the shape of
   every tensor (named, with both shapes), tensors missing from the checkpoint or without a place in the
   model — checkpoint names translated the way transformers translates them when loading;
4. `generation_config.json`, when present, is a valid generation config (transformers would otherwise
   silently fall back to the model config's);
5. the tokenizer and the image processor are present and load; the image token is in the vocabulary
   and is the id `config.json` names; the processor's images have the size the vision tower takes
   (its patch size and merge size for Qwen2-VL); the chat template the run will use (`model.chat_template`
   or the one stored in the checkpoint) compiles and renders.

A hub id is checked for reachability only (its files are the hub's). Each folder is checked once per
process while its files are unchanged (size, mtime, inode)."""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from harness.models.loading import (
    ModelLoadError, _check_reachable, _get, check_safetensors, family_of, load_processor, meta_model,
    resolve_pretrained, show_pretrained,
)

_CHECKED: set = set()  # (folder, stat stamp of its files) already found consistent in this process


class _Bad(Exception):
    """A disagreement inside the checkpoint: `file`, `why`."""

    def __init__(self, file: str, why: str):
        super().__init__(f"{file}: {why}")
        self.file, self.why = file, why


def check_checkpoint(model_cfg, *, model=None) -> None:
    """Refuse, in one `ModelLoadError` line, a checkpoint that cannot be found or whose files disagree
    (see the module docstring). `model`: the architecture already built on the meta device from the same
    `config.json` (validation builds one), to save building it again."""
    pretrained = _get(model_cfg, "pretrained")
    path, is_local = resolve_pretrained(pretrained)
    _check_reachable(path, is_local, _get(model_cfg, "revision"))
    if not is_local:
        return
    folder = Path(path)
    template = _get(model_cfg, "chat_template")
    stamp = (str(folder.resolve()), _stamp(folder), template)
    if stamp in _CHECKED:
        return
    trust = bool(_get(model_cfg, "trust_remote_code", False))
    with _quiet_transformers():
        _check(folder, pretrained, template, trust, model)
    _CHECKED.add(stamp)


def _quiet_transformers():
    """transformers' own warnings while the files are read (the check says what matters, in one line)."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet():
        log = logging.getLogger("transformers")
        old = log.level
        log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(old)

    return quiet()


def _check(folder: Path, pretrained, template, trust: bool, model=None) -> None:
    try:
        _check_json_files(folder)
        check_safetensors(folder)
        config = _config(folder, trust)
        _check_weights(folder, config, model)
        _check_generation_config(folder)
        _check_processor(folder, config, template, trust)
    except _Bad as e:
        raise ModelLoadError(f"model.pretrained={show_pretrained(pretrained)}: {e.file} {e.why}") from None


def _stamp(folder: Path) -> tuple:
    out = []
    for p in sorted(folder.iterdir()):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    return f"{type(e).__name__}: {first[:300]}"


# ---- 1. JSON files -----------------------------------------------------------------------------------------
def _check_json_files(folder: Path) -> None:
    """Every JSON file of the checkpoint that affects outputs (config, generation config, tokenizer,
    processor, chat template, shard index) parses strictly."""
    from harness.fingerprint import OUTPUT_FILES, _matching

    for p in _matching(folder, OUTPUT_FILES):
        if p.suffix != ".json":
            continue
        try:
            json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            raise _Bad(p.relative_to(folder).as_posix(), f"is not valid JSON (truncated or corrupt? {_first_line(e)})")


# ---- 3. weights against config.json -------------------------------------------------------------------------
def _config(folder: Path, trust: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise _Bad("config.json", f"cannot be read as a model config ({_first_line(e)})") from None


def _headers(folder: Path) -> dict[str, tuple[str, tuple]]:
    """`{tensor name: (file name, shape)}` from the safetensors headers (complete: checked before)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, t in header.items():
            if k != "__metadata__":
                out[k] = (f.name, tuple(int(x) for x in t["shape"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wmap = json.loads(index.read_text()).get("weight_map") or {}
        lost = sorted(k for k, f in wmap.items() if not (folder / f).is_file())
        if lost:
            raise _Bad(index.name, f"names shard(s) that are not in the folder: "
                                   f"{', '.join(sorted({wmap[k] for k in lost})[:3])}")
    return out


_STACK = re.compile(r"^(.*\.(?:layers|blocks|layer))\.(\d+)\.")


def _stack_config_key(prefix: str, config) -> str:
    vision = any(w in prefix for w in ("vision", "visual"))
    sub = "vision_config" if vision else "text_config"
    c = getattr(config, sub, None)
    for key in ("num_hidden_layers", "depth"):
        if c is not None and getattr(c, key, None) is not None:
            return f"{sub}.{key}={getattr(c, key)}"
    return f"{sub}.num_hidden_layers"


def _span(indices) -> str:
    s = sorted(indices)
    if not s:
        return "none"
    return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) else ",".join(map(str, s[:8])) + ("..." if len(s) > 8 else "")


def _check_weights(folder: Path, config, model=None) -> None:
    """The tensors of the safetensors headers against the architecture of `config` (meta device)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - older transformers: names are compared as they are
        get_model_conversion_mapping = None
    if model is None:
        model = meta_model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    transforms = get_model_conversion_mapping(model) if get_model_conversion_mapping else []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found: dict[str, tuple[str, tuple, str]] = {}  # model name -> (file, shape, checkpoint name)
    converted = False
    for name, (file, shape) in _headers(folder).items():
        new, pattern = rename_source_key(name, renamings, converters, getattr(model, "base_model_prefix", None),
                                         expected)
        converted |= pattern is not None
        found[new] = (file, shape, name)
    files = sorted({f for f, _, _ in found.values()})
    weights = files[0] if len(files) == 1 else "the safetensors weights"

    # layer counts per stack (a config.json claiming 12 layers for 8-layer weights, or 4)
    want_stacks: dict[str, set] = {}
    for k in expected:
        if m := _STACK.match(k):
            want_stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    got_stacks: dict[str, set] = {}
    for k in found:
        if (m := _STACK.match(k)) and m.group(1) in want_stacks:
            got_stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    for prefix, want in sorted(want_stacks.items()):
        got = got_stacks.get(prefix, set())
        if got and got != want:
            raise _Bad(weights, f"does not match its config.json: {_stack_config_key(prefix, config)} "
                                f"({len(want)} layers) but the weights hold layers {_span(got)} of {prefix}")

    # shapes of the tensors both sides know
    mismatched = [(k, found[k], expected[k]) for k in sorted(found) if k in expected and found[k][1] != expected[k]]
    if mismatched and not converted:
        shown = "; ".join(f"{ck} {list(got)} in the checkpoint, {list(want)} in the config"
                          for k, (_, got, ck), want in mismatched[:3])
        more = f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise _Bad(weights, f"does not match its config.json: {len(mismatched)} weight(s) whose shape disagrees: "
                            f"{shown}{more}")

    # tensors missing from the checkpoint, or without a place in the model (as transformers would report)
    ignore_missing = _regex(getattr(model, "_keys_to_ignore_on_load_missing", None))
    extra = set()
    buffers = [b for b, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        extra.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        extra.add(r"(^|\.)position_ids$")
    ignore_unexpected = _regex(set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()) | extra)
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    if not converted:
        missing = sorted(k for k in expected if k not in found and k not in tied
                         and not (ignore_missing and ignore_missing.search(k)))
        if missing:
            raise _Bad(weights, f"does not match its config.json: {len(missing)} weight(s) missing from the checkpoint "
                                f"(they would be random): {_few(missing)}")
    unexpected = sorted(found[k][2] for k in found if k not in expected
                        and not (ignore_unexpected and ignore_unexpected.search(k)) and not converted)
    if unexpected:
        raise _Bad(weights, f"does not match its config.json: {len(unexpected)} checkpoint weight(s) the config has "
                            f"no place for: {_few(unexpected)}")


def _regex(patterns):
    patterns = set(patterns or ())
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


def weights_problem(folder) -> str | None:
    """What `_check_weights` finds wrong with a folder's weights against its config.json (None if nothing)."""
    folder = Path(folder)
    try:
        _check_weights(folder, _config(folder, False))
    except _Bad as e:
        return str(e)
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return None
    return None


# ---- 4. generation config --------------------------------------------------------------------------------
def _check_generation_config(folder: Path) -> None:
    f = folder / "generation_config.json"
    if not f.is_file():
        return
    import warnings

    from transformers import GenerationConfig

    try:
        data = json.loads(f.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gc = GenerationConfig.from_pretrained(str(folder))
            gc.validate()  # errors only: minor issues (e.g. a temperature with do_sample=false) stay warnings
    except Exception as e:  # noqa: BLE001 - JSON, type and value errors of many kinds
        raise _Bad(f.name, f"is not a valid generation config ({_first_line(e)})") from None


# ---- 5. tokenizer, image processor, image token, chat template ------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json", "processor_config.json")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "processor_config.json")


def _image_processor_file(folder: Path) -> str | None:
    for name in _IMAGE_PROCESSOR_FILES:
        f = folder / name
        if f.is_file():
            if name != "processor_config.json" or "image_processor" in json.loads(f.read_text()):
                return name
    return None


def _check_processor(folder: Path, config, template: str | None, trust: bool) -> None:
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        raise _Bad("tokenizer", f"files are missing (none of {', '.join(_TOKENIZER_FILES)} in the folder)")
    ip_file = _image_processor_file(folder)
    if ip_file is None:
        raise _Bad("image processor", "config is missing (no preprocessor_config.json, or processor_config.json "
                                      "with an image_processor)")
    try:
        processor = load_processor(str(folder), family_of(config), None, trust)
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise many types
        raise _Bad("tokenizer/processor", f"files cannot be loaded ({_first_line(e)})") from None
    tok = getattr(processor, "tokenizer", None)

    # the image token: in the vocabulary, and the id config.json names
    token_id = getattr(config, "image_token_id", None)
    token_key = "image_token_id"
    if token_id is None:
        token_id, token_key = getattr(config, "image_token_index", None), "image_token_index"
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", None)
    if token_id is not None and vocab is not None and not 0 <= int(token_id) < int(vocab):
        raise _Bad("config.json", f"{token_key}={token_id} is outside the vocabulary (text_config.vocab_size={vocab})")
    image_token = getattr(processor, "image_token", None)
    if token_id is not None and tok is not None and isinstance(image_token, str):
        tok_id = tok.convert_tokens_to_ids(image_token)
        if tok_id is None or tok_id == getattr(tok, "unk_token_id", object()) or int(tok_id) != int(token_id):
            raise _Bad("config.json", f"{token_key}={token_id} but the tokenizer's image token {image_token!r} is "
                                      f"{'not in its vocabulary' if tok_id in (None, tok.unk_token_id) else f'id {tok_id}'}")
        if len(tok) > int(vocab or len(tok)):
            raise _Bad("tokenizer.json", f"has {len(tok)} tokens but config.json's text_config.vocab_size is {vocab}")

    # the processor's images against the vision tower
    _check_image_size(folder, ip_file, processor, config, image_token)

    # the chat template the run will use
    if template is None:
        template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
        source = _template_file(folder)
        if isinstance(template, dict):  # named templates: the default one is used
            template = template.get("default")
        if not template:
            raise _Bad("chat template", "is missing (no chat_template.jinja/.json, none in tokenizer_config.json); "
                                        "set model.chat_template")

        why = chat_template_error(template)
        if why:
            raise _Bad(source, f"holds a chat template that {why}")


def _template_file(folder: Path) -> str:
    """The file the stored chat template comes from (as the processor reads it: its own files first)."""
    for name in _TEMPLATE_FILES:
        f = folder / name
        if f.is_file() and (name.startswith("chat_template") or "chat_template" in json.loads(f.read_text())):
            return name
    return "chat template"


def _pair(v) -> tuple[int, int] | None:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    return None


def _check_image_size(folder: Path, ip_file: str, processor, config, image_token) -> None:
    from PIL import Image

    vc = getattr(config, "vision_config", None)
    ip = getattr(processor, "image_processor", None)
    if vc is None or ip is None:
        return
    try:
        pixels = ip(images=[Image.new("RGB", (96, 80), (127, 64, 32))], return_tensors="pt")["pixel_values"]
    except Exception as e:  # noqa: BLE001
        raise _Bad(ip_file, f"cannot process an image ({_first_line(e)})") from None
    patch = getattr(vc, "patch_size", None)
    if getattr(vc, "spatial_merge_size", None) is not None:  # Qwen2-VL: flattened patches
        tps = int(getattr(vc, "temporal_patch_size", 1) or 1)
        ch = int(getattr(vc, "in_channels", getattr(vc, "in_chans", 3)) or 3)
        want = ch * tps * int(patch) ** 2
        ip_patch, ip_merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
        if ip_patch is not None and int(ip_patch) != int(patch):
            raise _Bad(ip_file, f"cuts {ip_patch}-pixel patches but config.json's vision tower takes {patch} "
                                f"(vision_config.patch_size)")
        if ip_merge is not None and int(ip_merge) != int(vc.spatial_merge_size):
            raise _Bad(ip_file, f"merges {ip_merge}x{ip_merge} patches but config.json's vision tower merges "
                                f"{vc.spatial_merge_size} (vision_config.spatial_merge_size)")
        if pixels.shape[-1] != want:
            raise _Bad(ip_file, f"makes patches of {pixels.shape[-1]} values but config.json's vision tower takes "
                                f"{want} (channels x temporal_patch_size x patch_size^2)")
        return
    want = _pair(getattr(vc, "image_size", None))
    got = tuple(int(x) for x in pixels.shape[-2:])
    if want is not None and got != want:
        raise _Bad(ip_file, f"makes {got[0]}x{got[1]} images but config.json's vision tower takes "
                            f"{want[0]}x{want[1]} (vision_config.image_size)")
    if patch and want and (want[0] % int(patch) or want[1] % int(patch)):
        raise _Bad("config.json", f"vision_config.image_size={want[0]} is not a multiple of "
                                  f"vision_config.patch_size={patch}")
    ppatch = getattr(processor, "patch_size", None)
    if ppatch is not None and patch is not None and int(ppatch) != int(patch):
        raise _Bad("processor_config.json", f"patch_size={ppatch} but config.json's vision tower has "
                                            f"vision_config.patch_size={patch}")


def chat_template_error(template: str) -> str | None:
    """Why a chat template cannot be used (None if it can): it is compiled (transformers' sandboxed
    jinja2 environment) and rendered on a one-image user message, as the evaluation will."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateSyntaxError / TemplateError / anything the template raises
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"does not compile or render ({type(e).__name__}: {first})".replace(" ()", "")
    if not rendered or not str(rendered[0]).strip():
        return "renders an empty prompt"
    return None


def check_available(model_cfg, *, model=None) -> None:
    """Fail in one line, without loading any weights, if the checkpoint cannot be found or a local one is
    incomplete or inconsistent (`check_checkpoint`, the one checkpoint check; the entry point of `vtbench`,
    sweeps and `vtbench-calibrate`)."""
    check_checkpoint(model_cfg, model=model)


def _register() -> None:
    from harness.models import loading

    loading.explain_weights = weights_problem


_register()
