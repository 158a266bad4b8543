"""vtbench's lmms-eval model: a (possibly method-patched) Hugging Face LLaVA behind lmms-eval's API.

Registered through lmms-eval's public registry (entry point group `lmms_eval.models`, see
pyproject.toml), so the lmms-eval CLI can use it directly:

    lmms-eval --model vtbench --model_args model=tiny,method=fastv,method.params.R=0.75 \
        --include_path "$(vtbench-prepare)" --tasks vtbench_shapes --limit 8

`--model_args` are vtbench config overrides (the same `key=value` syntax as `vtbench`). The runner
builds the model itself and passes an instance (`VTBenchLMM(model=..., processor=..., ...)`).

Greedy decoding only. Batches are left-padded. A generation that raises is recorded in `failures`
(and answered with an empty string, which lmms-eval scores as wrong); empty answers are counted in
`n_empty`: the runner reports both, so nothing is silently scored.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

try:  # lmms-eval is installed with --no-deps by `make setup`; keep this module importable without it
    from lmms_eval.api.model import lmms as _LmmsBase
except Exception:  # pragma: no cover
    _LmmsBase = object

IMAGE_PLACEHOLDER = "<image>"


def manifest():
    """Entry point payload for lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtbench", simple_class_path="harness.lmms_model.VTBenchLMM")


def is_out_of_memory(e: BaseException) -> bool:
    """Out of (device) memory: the cell fails (and is retried by a rerun) instead of scoring samples."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


def parse_model_args(text: str) -> dict[str, str]:
    """`key=value,key=value` (lmms-eval's `--model_args`) as {key: raw value}; commas inside quotes,
    brackets or braces do not split. A malformed item (no `=`, empty key, empty item) or a key given twice
    raises ValueError naming it."""
    text = (text or "").strip()
    if not text:
        return {}
    items, cur, depth, quote = [], [], 0, None
    for i, ch in enumerate(text):
        if ch in ("'", '"') and (i == 0 or text[i - 1] != "\\"):
            quote = ch if quote is None else (None if ch == quote else quote)
        elif quote is None and ch in "[{":
            depth += 1
        elif quote is None and ch in "]}":
            depth -= 1
        elif quote is None and depth == 0 and ch == ",":
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    out: dict[str, str] = {}
    for item in items:
        if not item.strip():
            raise ValueError(f"--model_args {text!r}: empty item (a stray comma)")
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"--model_args {item.strip()!r}: expected key=value")
        if not key:
            raise ValueError(f"--model_args {item.strip()!r}: empty key")
        if key in out:
            raise ValueError(f"--model_args {key}: given twice ({key}={out[key]}, {key}={value.strip()})")
        out[key] = value.strip()
    return out


class VTBenchLMM(_LmmsBase):
    is_simple = True

    def __init__(
        self,
        model=None,
        processor=None,
        adapter=None,
        batch_size: int | str = 1,
        device: str | None = None,
        max_new_tokens: int | None = None,
        chat_template: str | None = None,
        progress: bool = True,
        on_batch: Any = None,
        max_batch_size: int | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        if isinstance(model, str):  # `--model_args model=<group>`: a vtbench model config, not an instance
            overrides = {"model": model, **overrides}
            model = None
        #: a model passed in belongs to the caller (the runner measures it after the evaluation), so
        #: lmms-eval's end-of-evaluation `clean()` must not delete it
        self.owns_model = model is None
        if model is None:
            overrides.pop("max_batch_size", None)  # lmms-eval's `--max_batch_size`: caps `auto` below
            model, processor, adapter, batch_size = self._build_from_overrides(
                overrides, device, batch_size, max_batch_size)
        elif overrides:
            raise TypeError(f"unexpected arguments with a model instance: {sorted(overrides)}")
        self._model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.adapter = adapter
        self.batch_size_per_gpu = int(batch_size)
        self._device = next(model.parameters()).device
        self.max_new_tokens = max_new_tokens
        self.chat_template = chat_template
        self.progress = progress
        #: called as on_batch(rows) after each batch with rows (task, split, doc_id, answer, nonfinite, recall)
        #: of the samples answered without error (per-sample resume store)
        self.on_batch = on_batch
        #: callable (task, split, doc_id) -> cached answer or None (per-sample resume)
        self.lookup = None
        #: {"task/doc_id": per-layer asked-cell recall | None} of the samples generated here, or None when
        #: not collected (`harness.recall`; the runner turns it on for `shapes`)
        self.recall: dict | None = None
        self.failures: dict[str, str] = {}
        #: "task/doc_id" of samples whose logits contained NaN/inf at some step
        self.nonfinite: list[str] = []
        self._last_nonfinite: list[int] = []
        self.n_empty = 0
        self.n_generated = 0

    # ---- construction from the lmms-eval CLI ------------------------------------------------------
    #: constructor arguments that `--model_args` may set (typed as lmms-eval types them); any other key is
    #: a vtbench config override, passed on as written (`model.pretrained=007` stays `007`)
    _INIT_ARGS = ("max_new_tokens", "chat_template", "progress")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's public constructor hook (`--model_args`), parsed strictly: every comma-separated item
        (commas inside quotes, brackets or braces do not split) is `key=value` with a non-empty key given
        once, and not one lmms-eval passes itself (`--batch_size`; `--device`, `--max_batch_size` when given). Bad input is one
        `vtbench: error:` line and exit 2 (lmms-eval's parser would end in a ValueError and exit 0)."""
        import sys

        from lmms_eval.utils import handle_arg_string

        try:
            kwargs = parse_model_args(arg_string)
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            for k in kwargs:
                if k in extra:  # e.g. batch_size, which lmms-eval always passes (`--batch_size`, default 1)
                    raise ValueError(f"--model_args {k}={kwargs[k]}: also set by lmms-eval's --{k} ({extra[k]}); "
                                     f"give it once, with --{k}")
                if k in ("processor", "adapter", "on_batch"):
                    raise ValueError(f"--model_args {k}={kwargs[k]}: not a command-line argument")
        except ValueError as e:
            print(f"vtbench: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        typed = {k: (handle_arg_string(v) if k in cls._INIT_ARGS + ("max_batch_size",) else v)
                 for k, v in kwargs.items()}
        return cls(**typed, **extra)

    @staticmethod
    def _build_from_overrides(overrides: dict, device: str | None, batch_size, max_batch_size):
        """Model, processor, adapter and batch size from the lmms-eval CLI's `--model_args` (vtbench config
        overrides, e.g. `model=tiny,method=fastv,budget.kind=tokens,budget.value=0.33`).

        `--batch_size auto` (or `auto:N`) takes the composed config's `run.batch_size` (a vtbench cell's
        batch size is a setting of the cell, not searched for), capped by `--max_batch_size`. Bad input
        ends lmms-eval in one line with exit 2 and a failed load with exit 1: lmms-eval itself would log
        the error and exit 0."""
        import re
        import sys

        from harness.errors import bad_input_errors, error_line, failure_reason
        from harness.config import compose_config, validate, validate_against_model
        from harness.models.loading import load_model

        args = [f"{k}={v}" for k, v in overrides.items()]
        if device:
            args.append(f"run.device={device}")
        try:
            cfg = compose_config(args)
            method = validate(cfg)
            method, _, budget = validate_against_model(cfg, method)
            bs = str(batch_size).strip()
            auto = re.fullmatch(r"auto(?::(\d+))?", bs)
            if auto and (auto.group(1) is None or int(auto.group(1)) >= 1):
                bs = cfg.run.batch_size if max_batch_size is None else min(cfg.run.batch_size, int(max_batch_size))
            elif not bs.isdigit() or int(bs) < 1:
                from harness.config import ConfigError

                raise ConfigError(f"--batch_size={batch_size!r}: a positive integer, auto or auto:N with N >= 1")
            model, processor, adapter = load_model(cfg.model, cfg.run.device, cfg.run.dtype)
            method.validate(adapter)
            method.apply(model, adapter)
        except bad_input_errors() as e:
            print(f"vtbench: error: {error_line(e)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception as e:  # noqa: BLE001 - a failed load must fail lmms-eval, not be logged and exit 0
            print(f"vtbench: model load failed: {failure_reason(e)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        vis = (budget or {}).get("visual_tokens_to_llm", (budget or {}).get("visual_tokens"))
        print(f"[vtbench] model={cfg.model.name} method={method.describe()}"
              + (f" budget={budget.get('kind')}:{budget.get('value')}" if budget else "")
              + (f" visual_tokens_to_llm={vis}" if vis is not None else "")
              + f" batch_size={int(bs)}", file=sys.stderr, flush=True)
        return model, processor, adapter, int(bs)

    def clean(self):
        if self.owns_model and hasattr(super(), "clean"):
            super().clean()

    # ---- lmms API ------------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    def build_prompt(self, context: str, n_images: int) -> str:
        text = context.replace(IMAGE_PLACEHOLDER, "").strip()
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        kwargs = {"chat_template": self.chat_template} if self.chat_template else {}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)

    def encode(self, contexts: list[str], visuals: list[list]) -> dict:
        """Processor inputs for a batch (left padded), on the model's device and dtype."""
        prompts = [self.build_prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        images = [im for v in visuals for im in v]
        inputs = self.processor(
            images=images or None, text=prompts, return_tensors="pt", padding=len(prompts) > 1
        )
        dtype = self._model.dtype
        return {
            k: (v.to(self._device, dtype) if torch.is_floating_point(v) else v.to(self._device))
            for k, v in inputs.items()
        }

    @torch.inference_mode()
    def generate_batch(self, contexts: list[str], visuals: list[list], max_new_tokens: int) -> list[str]:
        inputs = self.encode(contexts, visuals)
        self._last_input_ids = inputs["input_ids"]
        out = self._model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        # non-finite logits (fp16 overflow, a broken patch) are flagged per sample, never hidden
        finite = torch.stack([torch.isfinite(step).all(dim=-1) for step in out.logits], dim=1).all(dim=1)
        self._last_nonfinite = [i for i, ok in enumerate(finite.tolist()) if not ok]
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def visual_shape(self, visuals: list) -> tuple:
        """What fixes a prompt's visual-token layout: per image, (visual tokens the processor inserts,
        vision-encoder passes). LLaVA-1.5 images all give the same; LLaVA-NeXT's depend on the size."""
        from harness.efficiency.flops import num_crops, visual_tokens_for_image

        config = self._model.config
        ip = getattr(self.processor, "image_processor", None)
        out = []
        for im in visuals:
            w, h = im.size  # PIL: (width, height)
            if hasattr(ip, "merge_size") and hasattr(ip, "get_number_of_image_patches"):
                # dynamic resolution (Qwen2-VL): the processor's own pixel limits fix the count
                out.append((ip.get_number_of_image_patches(h, w, {}) // ip.merge_size**2, 1))
                continue
            out.append((visual_tokens_for_image(config, (h, w)), num_crops(config, [h, w])))
        return tuple(out)

    def shape_batches(self, requests, todo: list[int], bs: int) -> list[list[int]]:
        """Batches of at most `bs` requests whose prompts have the same visual layout (`visual_shape`), in
        request order within a shape, shapes in order of first appearance: every token-reduction method
        then keeps the same count in every sample of a batch, so a batch answers like batch 1. A request
        whose images cannot be read gets a batch of its own (it fails there, alone)."""
        if bs <= 1:
            return [[i] for i in todo]
        groups: dict = {}
        for i in todo:
            a = requests[i].args
            try:
                key = self.visual_shape(list(a[2](self.task_dict[a[4]][a[5]][a[3]])))
            except Exception:
                key = ("unreadable", i)
            groups.setdefault(key, []).append(i)
        return [g[s : s + bs] for g in groups.values() for s in range(0, len(g), bs)]

    @staticmethod
    def _truncate(text: str, until: list[str]) -> str:
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text.strip()

    def generate_until(self, requests) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        todo = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            cached = self.lookup(task, split, doc_id) if self.lookup else None
            if cached is not None:  # answered before an interruption: counted as if answered now
                answers[i] = cached
                self.n_empty += not cached
            else:
                todo.append(i)
        bs = self.batch_size_per_gpu
        pbar = tqdm(total=len(todo), desc="vtbench generate", disable=not self.progress, leave=False)
        try:  # the bar is cleared on any exit, so an error/interrupt message starts a clean line
            for idx in self.shape_batches(requests, todo, bs):
                args = [requests[i].args for i in idx]
                gen_kwargs = dict(args[0][1] or {})
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(self.max_new_tokens or gen_kwargs.get("max_new_tokens") or 32)
                contexts = [a[0] for a in args]
                bad: set[int] = set()
                try:  # reading a doc decodes its image: a corrupt one fails this sample, not the cell
                    docs = [self.task_dict[a[4]][a[5]][a[3]] for a in args]
                    visuals = [list(a[2](d)) for a, d in zip(args, docs)]
                    texts = self.generate_batch(contexts, visuals, max_new)
                    if self.recall is not None:  # read from the patched model's bookkeeping of this prefill
                        from harness.recall import asked_object_mask, layer_recall

                        questions = [str(d.get("question", "")) if isinstance(d, dict) else "" for d in docs]
                        masks = [asked_object_mask(d, q) for d, q in zip(docs, questions)]
                        for a, r in zip(args, layer_recall(self._model, self.adapter, self._last_input_ids, questions, masks)):
                            self.recall[f"{a[4]}/{a[3]}"] = r
                    bad = set(self._last_nonfinite)
                    self.nonfinite += [f"{args[j][4]}/{args[j][3]}" for j in sorted(bad)]
                except Exception as e:  # recorded, reported, never silently scored
                    if is_out_of_memory(e):  # a resource failure of the cell, not of the sample: retry later
                        raise
                    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    for a in args:
                        self.failures[f"{a[4]}/{a[3]}"] = msg
                    texts = [""] * len(idx)
                texts = [self._truncate(t, until) for t in texts]
                for i, t in zip(idx, texts):
                    answers[i] = t
                    self.n_generated += 1
                    if not t:
                        self.n_empty += 1
                if self.on_batch is not None:
                    failed = {f"{a[4]}/{a[3]}" for a in args} & set(self.failures)
                    rec = self.recall or {}
                    ok = [(a[4], a[5], a[3], t, j in bad, rec.get(f"{a[4]}/{a[3]}"))
                          for j, (a, t) in enumerate(zip(args, texts)) if f"{a[4]}/{a[3]}" not in failed]
                    if ok:
                        self.on_batch(ok)
                pbar.update(len(idx))
        finally:
            pbar.close()
        return [a if a is not None else "" for a in answers]

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each continuation given its context and images (batch 1).

        One forward over context + continuation, with the generation semantics: a method that selects
        tokens from the last prompt token scores from the last *context* token
        (`methods._shared.llm_reduce.continuation`), so the continuation's log-probs equal those that
        generating after the context gives (tests check this for every method)."""
        from methods._shared.llm_reduce import continuation as as_continuation

        res = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]))
            ctx_inputs = self.encode([context], [visuals])
            cont_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            cont_ids = cont_ids.to(self._device)
            ids = torch.cat([ctx_inputs["input_ids"], cont_ids], dim=1)
            inputs = dict(ctx_inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
            if "mm_token_type_ids" in ctx_inputs:  # Qwen2-VL: the continuation is text
                inputs["mm_token_type_ids"] = torch.cat(
                    [ctx_inputs["mm_token_type_ids"], torch.zeros_like(cont_ids)], dim=1)
            with as_continuation(self._model, cont_ids.shape[1]):
                logits = self._model(**inputs).logits[0, -cont_ids.shape[1] - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            target = cont_ids[0]
            total = logprobs.gather(-1, target[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == target).all())
            res.append((total, greedy))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtbench: multi-round generation is not supported")
