"""Load a model + processor from a model config (`conf/model/*.yaml`).

`pretrained` is a hub id, a local directory, `builtin:<name>` (a folder under `harness/assets`) or
`project:<path>` (a folder under the vtbench checkout, never the current directory).
Only safetensors weights are loaded; `trust_remote_code` is off unless the model config sets it.
`config_from_cfg` gives the architecture without weights (from the config's `arch` block or the
checkpoint's `config.json`), and `meta_model` builds it on the meta device for validation and FLOPs.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from harness.models.adapter import ModelAdapter, family_of, get_adapter

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: the vtbench checkout: `project:<path>` in `model.pretrained` is a folder under it (e.g. the tiny
#: checkpoints of `make tiny-families`, `project:runs/tiny/qwen2_vl`), wherever vtbench is run from
PROJECT = ASSETS.parent.parent

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded (missing checkpoint, offline hub id, corrupt file). One line."""


def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if not hasattr(cfg, "get") else cfg.get(key, default)


def resolve_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def show_pretrained(pretrained) -> str:
    """`model.pretrained` as shown in one error line (a long value shortened)."""
    text = str(pretrained)
    return text if len(text) <= 200 else text[:120] + "..." + text[-40:]


def resolve_pretrained(pretrained: str) -> tuple[str, bool]:
    """Return `(path_or_id, is_local)`; raise ModelLoadError for a missing local/builtin folder, or a
    value that can be neither a folder nor a hub id (e.g. a name too long for the file system)."""
    if not pretrained:
        raise ModelLoadError("model.pretrained is empty")
    try:
        return _resolve_pretrained(pretrained)
    except OSError as e:  # ENAMETOOLONG and the like, from stat
        raise ModelLoadError(f"model.pretrained={show_pretrained(pretrained)}: not a usable path "
                             f"({e.strerror or e})") from None


def _resolve_pretrained(pretrained: str) -> tuple[str, bool]:
    if pretrained.startswith("builtin:"):
        path = ASSETS / pretrained.split(":", 1)[1]
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"built-in model folder {path} has no config.json (run `make tiny-model` to train it)"
            )
        return str(path), True
    if pretrained.startswith("project:"):
        path = PROJECT / pretrained.split(":", 1)[1]
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.pretrained={show_pretrained(pretrained)}: {path} has no config.json "
                                 "(`make tiny-families` writes the tiny checkpoints under runs/tiny/)")
        return str(path), True
    p = Path(os.path.expanduser(pretrained))
    looks_local = pretrained.startswith((".", "/", "~")) or p.exists()
    if looks_local:
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"local checkpoint {p} not found (no config.json)")
        return str(p), True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # neither a folder nor a valid hub id (`org/name`, at most 96 characters)
        validate_repo_id(pretrained)
    except HFValidationError as e:
        raise ModelLoadError(f"model.pretrained={show_pretrained(pretrained)}: no such local folder, and not a "
                             f"valid hub id ({str(e).strip().splitlines()[0][:120]})") from None
    return pretrained, False


def _check_reachable(path: str, is_local: bool, revision: str | None = None) -> None:
    """Fail in one line when a hub id cannot be resolved (offline and not in the local HF cache)."""
    if is_local:
        return
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    if hub_offline():
        raise ModelLoadError(
            f"hub id {path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
            "download it first or point model.pretrained at a local directory"
        )


def check_safetensors(path: str | os.PathLike) -> None:
    """A local checkpoint must hold complete safetensors weights (only those are ever loaded: no
    pickle): fail in one line on none (e.g. only pytorch_model.bin) or a truncated/garbled file,
    reading only the headers."""
    import json
    import struct

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(others)}: pickle weights are never loaded; convert them to safetensors)" if others else ""
        raise ModelLoadError(f"checkpoint {folder} has no safetensors weights{hint}")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
            raise ModelLoadError(f"corrupt safetensors file {f}: {e}") from None
        if 8 + n + end != size:
            raise ModelLoadError(
                f"truncated or corrupt safetensors file {f}: {size} bytes, header says {8 + n + end}"
            )


#: names the tensors whose shapes disagree with the config (`harness.models.checkpoint.weights_problem`,
#: which registers itself on import: the checkpoint check builds on this module, not the other way round)
explain_weights = None


def config_from_cfg(model_cfg) -> Any:
    """The transformers config of a model config, without loading weights."""
    from transformers import AutoConfig

    arch = _get(model_cfg, "arch")
    if arch:
        arch = dict(arch) if not isinstance(arch, dict) else arch
        try:
            from omegaconf import OmegaConf

            if not isinstance(arch, dict) or any(hasattr(v, "_metadata") for v in arch.values()):
                arch = OmegaConf.to_container(OmegaConf.create(arch), resolve=True)
        except Exception:  # pragma: no cover - plain dicts
            pass
        arch = dict(arch)
        model_type = arch.pop("model_type")
        return AutoConfig.for_model(model_type, **arch)
    path, is_local = resolve_pretrained(_get(model_cfg, "pretrained"))
    _check_reachable(path, is_local, _get(model_cfg, "revision"))
    try:
        return AutoConfig.from_pretrained(
            path, revision=_get(model_cfg, "revision"), trust_remote_code=bool(_get(model_cfg, "trust_remote_code", False))
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {path!r}: {str(e).splitlines()[0]}") from None


def meta_model(config) -> torch.nn.Module:
    """Instantiate the architecture on the meta device (no memory for weights), in eval mode."""
    from transformers import AutoModelForImageTextToText

    family_of(config)  # raises NotApplicable for unsupported families
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return model.eval()


def meta_adapter(model_cfg) -> ModelAdapter:
    return get_adapter(meta_model(config_from_cfg(model_cfg)))


@functools.lru_cache(maxsize=None)
def image_only_processor(cls):
    """`cls` (a Qwen2-VL-style processor) without its video processor: transformers 5's video processors
    (and its default "fast" image processors) need torchvision, which vtbench does not install (it evaluates
    images only). `from_pretrained` of the returned class loads the tokenizer and the image processor."""
    class ImageOnly(cls):
        # the family's own __init__ sets its attributes (image token, feature counts); ProcessorMixin then
        # takes only the two sub-processors this signature names (the video processor argument is dropped)
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"{cls.__name__}ImageOnly"
    return ImageOnly


#: families whose processor is loaded image-only, with the PIL image processor (no torchvision)
_IMAGE_ONLY = {
    "qwen2_vl": ("transformers.models.qwen2_vl.processing_qwen2_vl:Qwen2VLProcessor",
                 "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.processing_qwen2_5_vl:Qwen2_5_VLProcessor",
                   "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil"),
    "llava_onevision": ("transformers.models.llava_onevision.processing_llava_onevision:LlavaOnevisionProcessor",
                        "transformers.models.llava_onevision.image_processing_pil_llava_onevision:"
                        "LlavaOnevisionImageProcessorPil"),
}


def load_processor(path: str, family: str, revision=None, trust: bool = False):
    """The processor of a checkpoint: `AutoProcessor`, or for the Qwen families the image-only processor
    with the PIL image processor (same resizing and normalisation as the torchvision one)."""
    from transformers import AutoProcessor, AutoTokenizer

    if family not in _IMAGE_ONLY:
        return AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust)
    import importlib

    (pmod, pcls), (imod, icls) = (x.split(":") for x in _IMAGE_ONLY[family])
    proc_cls = image_only_processor(getattr(importlib.import_module(pmod), pcls))
    ip = getattr(importlib.import_module(imod), icls).from_pretrained(path, revision=revision)
    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust)
    # the processor's own chat template (chat_template.jinja / .json, as AutoProcessor reads it), else the tokenizer's
    template = _processor_template(path, revision) or getattr(tok, "chat_template", None)
    return proc_cls(image_processor=ip, tokenizer=tok, chat_template=template, **_processor_kwargs(path, revision))


def _processor_kwargs(path: str, revision=None) -> dict:
    """The processor's own settings from processor_config.json (e.g. OneVision's num_image_tokens)."""
    import json

    from huggingface_hub import try_to_load_from_cache

    p = Path(path)
    f = p / "processor_config.json" if p.is_dir() else try_to_load_from_cache(path, "processor_config.json",
                                                                             revision=revision)
    if not (isinstance(f, (str, Path)) and Path(f).is_file()):
        return {}
    data = json.loads(Path(f).read_text())
    keep = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token", "video_token")
    return {k: v for k, v in data.items() if k in keep}


def _processor_template(path: str, revision=None) -> str | None:
    import json

    from huggingface_hub import try_to_load_from_cache

    p = Path(path)
    for name in ("chat_template.jinja", "chat_template.json"):
        f = p / name if p.is_dir() else try_to_load_from_cache(path, name, revision=revision)
        if isinstance(f, (str, Path)) and Path(f).is_file():
            text = Path(f).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_model(model_cfg, device: str = "cpu", dtype: str | None = None):
    """Load `(model, processor, adapter)` for a model config. Safetensors only; eval mode."""
    from transformers import AutoModelForImageTextToText

    path, is_local = resolve_pretrained(_get(model_cfg, "pretrained"))
    _check_reachable(path, is_local, _get(model_cfg, "revision"))
    torch_dtype = resolve_dtype(dtype or _get(model_cfg, "dtype"))
    trust = bool(_get(model_cfg, "trust_remote_code", False))
    revision = _get(model_cfg, "revision")
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            path,
            revision=revision,
            dtype=torch_dtype,
            attn_implementation=_get(model_cfg, "attn_implementation", "sdpa"),
            trust_remote_code=trust,
            use_safetensors=True,
            device_map=device,
            output_loading_info=True,
        )
        _check_loading_info(path, info)
        processor = load_processor(path, family_of(model.config), revision, trust)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_local and "mismatched" in msg.lower() and explain_weights is not None:
            # transformers points at a report its default verbosity hides: name the tensors and shapes instead
            msg = explain_weights(path) or msg
        raise ModelLoadError(f"cannot load {path!r}: {msg}") from None
    model.eval()
    adapter = get_adapter(model)
    _check_arch(model_cfg, model.config)
    return model, processor, adapter


def _check_loading_info(path: str, info: dict) -> None:
    """transformers initialises missing weights randomly and drops unexpected ones, with a report hidden
    by the default verbosity: here any of them means the checkpoint does not match its config (a missing
    tensor, a wrong layer count, a wrong shape), and the model is refused."""
    for field, what in (("missing_keys", "weights missing from the checkpoint (they would be random)"),
                        ("unexpected_keys", "checkpoint weights the config has no place for"),
                        ("mismatched_keys", "weights whose shape disagrees with the config"),
                        ("error_msgs", "loading errors")):
        items = sorted(str(x if not isinstance(x, tuple) else x[0]) for x in (info.get(field) or ()))
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            raise ModelLoadError(f"checkpoint {path} does not match its config.json: {len(items)} {what}: "
                                 f"{', '.join(items[:3])}{more}")


def _check_arch(model_cfg, config) -> None:
    """If the model config embeds `arch`, it must agree with the loaded checkpoint."""
    arch = _get(model_cfg, "arch")
    if not arch:
        return
    tc = _get(arch, "text_config") or {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        want = _get(tc, key)
        got = getattr(config.text_config, key, None)
        if want is not None and got is not None and int(want) != int(got):
            raise ModelLoadError(
                f"model config arch.text_config.{key}={want} disagrees with the checkpoint ({got})"
            )
