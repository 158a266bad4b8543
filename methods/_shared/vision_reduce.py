"""Shared machinery for visual-token reduction *inside the CLIP vision encoder* (ToMe, FiCoCo-V).

Three pieces, all installed on one loaded model instance (nothing global, no transformers fork):

1. **Reducing encoder layers** (`patch_vision_layers`). The `forward` of selected `CLIPEncoderLayer`
   instances is replaced by the same computation (LN1 -> q/k/v -> attention -> out-proj -> residual ->
   LN2 -> MLP -> residual) with a reduction step between the attention residual and LN2/MLP:
   `reducer.reduce(layer, x, q, k, state, r)` returns fewer tokens. The attention output still goes
   through the model's own attention interface (SDPA by default); the reducer gets the layer's own
   q/k so it can compute whatever scores it needs (ToMe: head-mean keys; FiCoCo-V: one extra QK^T).
   A `VisionState` travels through the encoder for one call: per-token `size` (how many original
   patches a token stands for), `pos` (smallest original encoder index it contains; CLS = 0) and the
   token count entering each layer. With `reducer.prop_attn`, layers after the first merge add
   `log(size)` of each key to the attention logits (ToMe's proportional attention), passed to SDPA
   as an additive float mask. Index 0 (CLS) is kept at index 0 by every reducer, so LLaVA's
   `vision_feature_select_strategy="default"` (drop index 0) still drops CLS.
   Hidden states are collected by transformers' output-capturing forward hooks on the layer modules,
   so the shortened `hidden_states[vision_feature_layer]` flows to the projector unchanged; reductions
   are only scheduled up to `adapter.last_useful_vision_layer` (later layers still run in HF, on the
   reduced sequence, but their output never reaches the LLM).

2. **Placeholder shrinking** (`install_placeholder_shrink`). The processor expands `<image>` into the
   full number of placeholder ids and LLaVA checks `#placeholders == #features`. The model instance's
   `forward` and `generate` are wrapped so that, per sample and per image, the placeholder run is cut
   to the method's known output count *before* the original runs (left padding is rebuilt when samples
   lose different numbers of tokens). Prefill and decode therefore see one consistent, shorter
   sequence: positions are contiguous, the KV cache and masks are standard. `generate` returns the
   caller's original prompt ids followed by the new tokens, so `out[:, inputs.input_ids.shape[1]:]`
   keeps working; a direct `forward` returns logits over the shortened sequence. Precomputed features
   (`mm_encoder_outputs`) are matched to the placeholder runs; on the meta device (FLOPs counting
   without weights) the cut is shape-only. The visual tokens the LLM receives are logged in the
   visual-token context (`visual_tokens_per_layer`) at each prefill.

3. **LLaVA-NeXT packing** (same function). Every anyres crop (base + high-res crops) is a separate
   image for CLIP and is reduced independently to the same count k. The 2-D unpadding / per-row
   `image_newline` layout needs full 24x24 grids, so the patched `pack_image_features` of the instance
   packs each image as `[base crop k tokens, crop 1 k tokens, ..., crop c k tokens, image_newline]`
   (crops in the processor's row-major order, one newline closing the image). The placeholder run of
   an image is resized from the processor's count to `crops * k + 1`: usually a cut, but a run grows
   where the processor's count (unpadded grid + one newline per row) is smaller, e.g. a mild fixed
   budget (ToMe `r`, `tokens`) on a small or non-square image; per-prompt budgets never exceed it.

4. **Method plumbing** (`VisionReductionMethod`): fixed per-layer schedules, validation against the
   model, `apply`, `visual_tokens_to_llm` and the analytic FLOPs (per pass: patch embedding +
   `vit_layer_macs(n_in, n_out)` per layer + the reducer's scoring/merging matmuls; projector and LLM over
   the reduced count), shared by ToMe and FiCoCo-V.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch

from methods.base import Method, MethodError

_PATCHED = "_vtbench_vision_reduce"


# ---- schedules --------------------------------------------------------------------------------------
def split_evenly(total: int, layers: list[int]) -> dict[int, int]:
    """Spread `total` removals over `layers` deterministically: every layer gets `total // L`, the
    last `total % L` layers one more (later layers have fewer tokens left, so the early ones, which
    cost the most, are not burdened first). E.g. 384 over 23 layers -> 7x16 then 16x17."""
    if not layers:
        return {}
    q, rem = divmod(int(total), len(layers))
    n = len(layers)
    return {layer: q + (1 if i >= n - rem else 0) for i, layer in enumerate(layers)}


def tokens_through_layers(n0: int, schedule: dict[int, int], num_layers: int) -> list[tuple[int, int]]:
    """(tokens in, tokens out) of each encoder layer, for `n0` tokens entering layer 0."""
    out, n = [], n0
    for layer in range(num_layers):
        r = schedule.get(layer, 0)
        out.append((n, n - r))
        n -= r
    return out


# ---- per-call state ---------------------------------------------------------------------------------
@dataclass
class VisionState:
    """What travels through the encoder during one vision-tower call (batch of images / crops)."""

    #: [B, N] float: number of original tokens each token represents (None = all ones)
    size: torch.Tensor | None = None
    #: [B, N] long: smallest original encoder index the token contains (0 = CLS, 1 + p = patch p)
    pos: torch.Tensor | None = None
    #: tokens entering each encoder layer, {layer: n}
    tokens_in: dict[int, int] = field(default_factory=dict)
    #: content bookkeeping, only when `track` is set (asked-cell recall, harness/recall.py): [B, N, N0] float,
    #: the share of each original token (0 = CLS, 1 + p = patch p) in every current token (rows sum to 1),
    #: updated by the reducers with their own merge weights (ToMe: sizes; FiCoCo-V: alpha); None = identity
    source: torch.Tensor | None = None
    track: bool = False


class VisionReducer:
    """Base of a vision-encoder reduction. Subclasses implement `reduce`."""

    #: add log(size) of the keys to attention logits after the first merge
    prop_attn: bool = False

    def __init__(self, schedule: dict[int, int]):
        self.schedule = {int(k): int(v) for k, v in schedule.items() if int(v) > 0}

    def reduce(self, layer: int, x, q, k, state: VisionState, r: int):
        """x [B, N, D] (after the attention residual), q/k [B, H, N, dh] of this layer's attention.
        Return the reduced x [B, N - r, D]; update `state.size` / `state.pos` consistently."""
        raise NotImplementedError


@dataclass
class _Holder:
    state: VisionState | None = None
    last: VisionState | None = None
    #: keep `VisionState.source` (set by harness.recall while it measures; off for timing)
    track: bool = False


def _encoder(adapter):
    return adapter.vision_tower.encoder


def patch_vision_layers(model, adapter, reducer: VisionReducer, *, force_layers: set[int] | None = None):
    """Install `reducer` on the CLIP encoder of this model instance. `force_layers` also routes those
    layers through the patched forward with r=0 (used by tests to show the path is exact)."""
    if getattr(model, _PATCHED, None) is not None:
        raise MethodError("this model instance already has a vision-encoder reduction applied")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.clip.modeling_clip import eager_attention_forward

    holder = _Holder()
    enc = _encoder(adapter)
    original_enc_forward = enc.forward

    @functools.wraps(original_enc_forward)
    def enc_forward(inputs_embeds, *args, **kwargs):
        B, N, _ = inputs_embeds.shape
        pos = torch.arange(N, device=inputs_embeds.device).expand(B, N)
        holder.state = VisionState(size=None, pos=pos, track=holder.track)
        try:
            return original_enc_forward(inputs_embeds, *args, **kwargs)
        finally:
            holder.last, holder.state = holder.state, None

    enc.forward = enc_forward

    sched = dict(reducer.schedule)
    first = min(sched) if sched else None
    layers = set(sched) | set(force_layers or ())
    if reducer.prop_attn and first is not None:
        layers |= set(range(first + 1, len(adapter.vision_layers)))

    def make_forward(idx, layer):
        attn = layer.self_attn

        def forward(hidden_states, attention_mask=None, **kwargs):
            st = holder.state
            B, N, _ = hidden_states.shape
            residual = hidden_states
            h = layer.layer_norm1(hidden_states)
            shape = (B, N, -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            mask = attention_mask
            if reducer.prop_attn and st is not None and st.size is not None:
                bias = st.size.log().to(q.dtype)[:, None, None, :]
                mask = bias if mask is None else mask + bias
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                attn.config._attn_implementation, eager_attention_forward
            )
            out, _ = interface(
                attn, q, k, v, mask, scaling=attn.scale, dropout=0.0 if not attn.training else attn.dropout,
                **kwargs,
            )
            out = attn.out_proj(out.reshape(B, N, -1).contiguous())
            x = residual + out
            r = reducer.schedule.get(idx, 0)  # read per call: a per-prompt budget sets it per forward
            if r > 0 and st is not None:
                x = reducer.reduce(idx, x, q, k, st, r)
            residual = x
            x = layer.mlp(layer.layer_norm2(x))
            return residual + x

        return forward

    for idx in sorted(layers):
        layer = adapter.vision_layers[idx]
        layer.forward = make_forward(idx, layer)

    def count_tokens(idx):
        def hook(module, args):
            if holder.state is not None and args:
                holder.state.tokens_in[idx] = int(args[0].shape[1])

        return hook

    for idx, layer in enumerate(adapter.vision_layers):
        layer.register_forward_pre_hook(count_tokens(idx))
    object.__setattr__(model, _PATCHED, holder)
    return holder


def last_vision_state(model) -> VisionState | None:
    """The `VisionState` of the most recent vision-tower call (tokens per layer, sizes, positions)."""
    holder = getattr(model, _PATCHED, None)
    return None if holder is None else holder.last


# ---- helpers reducers share ---------------------------------------------------------------------------
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] gathered at idx [B, M] along dim 1."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


# ---- placeholder shrinking ----------------------------------------------------------------------------
def _placeholder_runs(is_img: torch.Tensor) -> list[int]:
    """Lengths of the contiguous placeholder runs, sample by sample (batch order)."""
    runs = []
    for row in is_img.long():
        edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        runs += (ends - starts).tolist()
    return runs


def shrink_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    full_counts: list[int],
    reduced_counts: list[int],
    image_token_id: int,
    pad_token_id: int,
):
    """Resize each image's placeholder run (in batch order) from its full count to its reduced count.

    Usually a cut; a run grows (placeholder ids inserted after the image's last one) where the reduced
    count exceeds the processor's: LLaVA-NeXT images packed as `crops * k + 1` tokens without the
    unpadding, whose unpadded processor count is smaller (a mild reduction of a small or non-square image).
    Returns `(input_ids, attention_mask, changed)`. If the ids already carry the reduced counts they are
    returned unchanged; any other placeholder total is an error. Samples are re-left-padded when their
    lengths change by different amounts."""
    if input_ids.device.type == "meta":
        # shapes only (FLOPs counting without weights): drop (or add) the removed count per sample,
        # assuming the images are spread evenly over the batch and the ids carry the full counts
        B, T = input_ids.shape
        removed = (sum(full_counts) - sum(reduced_counts)) // max(B, 1)
        if removed >= 0:
            mask = None if attention_mask is None else attention_mask[:, removed:]
            return input_ids[:, removed:], mask, removed > 0
        ids = torch.empty((B, T - removed), dtype=input_ids.dtype, device="meta")
        mask = None if attention_mask is None else torch.empty(
            (B, T - removed), dtype=attention_mask.dtype, device="meta"
        )
        return ids, mask, True
    is_img = input_ids == image_token_id
    total = int(is_img.sum())
    full_sum, red_sum = sum(full_counts), sum(reduced_counts)
    if list(full_counts) == list(reduced_counts):
        return input_ids, attention_mask, False
    if total == red_sum and (total != full_sum or _placeholder_runs(is_img) == list(reduced_counts)):
        return input_ids, attention_mask, False  # already reduced (equal totals: told apart by the runs)
    if total != full_sum:
        raise ValueError(
            f"found {total} image placeholder tokens; expected {full_sum} (full) or "
            f"{red_sum} (already reduced) for {len(full_counts)} image(s)"
        )
    B, T = input_ids.shape
    reps = torch.ones(B, T, dtype=torch.long, device=input_ids.device)  # copies of each position
    image = 0
    for b in range(B):
        where = torch.nonzero(is_img[b]).flatten().tolist()
        start = 0
        while start < len(where):
            f, c = full_counts[image], reduced_counts[image]
            run = where[start : start + f]
            if len(run) < f:
                raise ValueError(f"sample {b}: image {image} has fewer than {f} placeholder tokens")
            if c < f:
                reps[b, run[c:]] = 0
            elif c > f:
                reps[b, run[-1]] += c - f
            start += f
            image += 1
    if attention_mask is not None:
        reps = reps * attention_mask.bool()  # old padding is dropped and rebuilt
    lengths = reps.sum(1)
    L = int(lengths.max())
    new_ids = torch.full((B, L), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = None
    if attention_mask is not None:
        new_mask = torch.zeros((B, L), dtype=attention_mask.dtype, device=attention_mask.device)
    elif int(lengths.min()) != L:
        new_mask = torch.zeros((B, L), dtype=torch.long, device=input_ids.device)
    for b in range(B):
        n = int(lengths[b])
        new_ids[b, L - n :] = input_ids[b].repeat_interleave(reps[b])
        if new_mask is not None:
            new_mask[b, L - n :] = 1
    return new_ids, new_mask, True


def _as_kwargs(fn, args, kwargs) -> dict:
    """Positional arguments of a call to `fn` turned into keyword arguments."""
    if not args:
        return dict(kwargs)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]
    if len(args) > len(names):
        raise TypeError(f"{getattr(fn, '__name__', fn)}() got {len(args)} positional arguments")
    return {**dict(zip(names, args)), **kwargs}


def install_placeholder_shrink(model, adapter, tokens_per_crop, on_tokens=None):
    """Wrap this instance's `forward` / `generate` (and NeXT packing) so each image contributes
    `tokens_per_crop` visual tokens per CLIP pass (LLaVA: one pass per image; NeXT: per crop, plus one
    `image_newline` per image; that count may exceed the processor's unpadded one, and the run then
    grows, see `shrink_placeholders`).

    `tokens_per_crop` is an int, or a per-prompt budget: a callable `(n_visual, crops, images) -> k`
    giving the count per crop for a prompt whose processor inserted `n_visual` visual tokens for
    `images` images of `crops` CLIP passes in all. It is evaluated per forward (per `generate`: once,
    for all its steps) on the caller's ids; every prompt of a batch must get the same k (batch prompts
    of one shape; the runner does); `on_tokens(k)` is then called before the vision tower runs."""
    from methods._shared.context import announce_prompt_visual, install_context

    ctx = install_context(model, adapter)
    full_per_crop = adapter.visual_tokens_per_image
    image_token_id = adapter.image_token_id
    pad = adapter.text_config.pad_token_id
    pad = getattr(adapter.config, "pad_token_id", None) if pad is None else pad
    pad = 0 if pad is None else int(pad)
    nxt = adapter.family == "llava_next"
    base = adapter.base
    fixed: dict[str, int | None] = {"k": None, "last": None}  # k fixed for the forwards of one generate call

    if nxt:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        original_pack = base.pack_image_features
        cfg = adapter.config

        def crops_of(size) -> int:
            return image_size_to_num_patches(
                image_size=size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )

        def full_count(size) -> int:
            c = crops_of(size)
            dummy = [torch.zeros(c, full_per_crop, 1)]
            _, lens = original_pack(
                dummy, size[None], cfg.vision_feature_select_strategy, image_newline=torch.zeros(1)
            )
            return int(lens[0])

        def pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
            feats, lens = [], []
            for f in image_features:
                f = f.reshape(-1, f.shape[-1])
                if image_newline is not None:
                    f = torch.cat((f, image_newline[None].to(f)), dim=0)
                feats.append(f)
                lens.append(f.shape[0])
            return feats, torch.tensor(lens, dtype=torch.long, device=image_features[0].device)

        base.pack_image_features = pack

    newline = 1 if nxt and base.image_newline is not None else 0

    def images_per_sample(ids, full) -> list[list[int]]:
        """Image indices (batch order) of each sample, matched to the samples' placeholder counts."""
        B = ids.shape[0]
        if ids.device.type == "meta":  # no values: the images are spread evenly over the batch
            per = len(full) // max(B, 1)
            return [list(range(b * per, (b + 1) * per)) for b in range(B)]
        groups, i = [], 0
        for n in (ids == image_token_id).sum(1).tolist():
            g, left = [], n
            while left > 0 and i < len(full):
                g.append(i)
                left -= full[i]
                i += 1
            if left != 0:
                raise ValueError(
                    "image placeholder runs do not match the images' full counts (a per-prompt budget needs the "
                    "processor's ids)"
                )
            groups.append(g)
        return groups

    def per_crop(kwargs, full, crops) -> int:
        if not callable(tokens_per_crop):
            return int(tokens_per_crop)
        if fixed["k"] is not None:
            return fixed["k"]
        groups = images_per_sample(kwargs["input_ids"], full)
        ks = [tokens_per_crop(sum(full[j] for j in g), sum(crops[j] for j in g), len(g)) for g in groups if g]
        if not ks:
            return full_per_crop
        if len(set(ks)) > 1:
            raise MethodError(
                f"prompts of this batch need different visual tokens per crop ({', '.join(map(str, ks))}) for "
                "the same prompt budget; batch prompts with the same visual-token count (the runner groups them)"
            )
        if on_tokens is not None:
            on_tokens(ks[0])
        fixed["last"] = ks[0]
        return ks[0]

    def counts(kwargs):
        pv = kwargs.get("pixel_values")
        if pv is None:
            return counts_from_features(kwargs)
        if not nxt:
            n = pv.shape[0]
            full, crops = [full_per_crop] * n, [1] * n
        else:
            sizes = kwargs.get("image_sizes")
            full = [full_count(s) for s in sizes]
            crops = [crops_of(s) for s in sizes]
        k = per_crop(kwargs, full, crops)
        return full, [c * k + newline if nxt else k for c in crops]

    def counts_from_features(kwargs):
        """Precomputed features (`mm_encoder_outputs`, already reduced): reduced counts from the
        features, full counts from the contiguous placeholder runs (one run per image)."""
        feats = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        ids = kwargs.get("input_ids")
        if feats is None or ids is None:
            return None
        red = [int(f.shape[0]) for f in feats.pooler_output]
        full = _placeholder_runs(ids == image_token_id)
        if len(full) != len(red):
            return None
        return full, red

    def shrink(kwargs):
        ids = kwargs.get("input_ids")
        if ids is None:
            return kwargs, False
        cr = counts(kwargs)
        if cr is None:
            return kwargs, False
        new_ids, new_mask, changed = shrink_placeholders(
            ids, kwargs.get("attention_mask"), cr[0], cr[1], image_token_id, pad
        )
        if changed:
            if ids.device.type != "meta":
                announce_prompt_visual(model, (ids == image_token_id).sum(1).cpu())
            kwargs = dict(kwargs, input_ids=new_ids)
            if new_mask is not None:
                kwargs["attention_mask"] = new_mask
            if kwargs.get("position_ids") is not None:
                m = new_mask if new_mask is not None else torch.ones_like(new_ids)
                kwargs["position_ids"] = (m.long().cumsum(-1) - 1).clamp(min=0)
            for key in ("labels", "token_type_ids"):
                if kwargs.get(key) is not None:
                    raise ValueError(f"`{key}` cannot be combined with a vision-side token reduction")
        return kwargs, changed

    original_forward = model.forward
    original_generate = model.generate

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        kwargs, _ = shrink(_as_kwargs(original_forward, args, kwargs))
        return original_forward(**kwargs)

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        kwargs = _as_kwargs(original_generate, args, kwargs)
        if isinstance(kwargs.get("inputs"), torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        orig_ids = kwargs.get("input_ids")
        kwargs, changed = shrink(kwargs)
        if callable(tokens_per_crop) and changed:
            fixed["k"] = fixed["last"]  # this prompt's k, for the generation's own (shortened) forwards
        try:
            out = original_generate(**kwargs)
        finally:
            fixed["k"] = None
        if not changed:
            return out
        t_short = kwargs["input_ids"].shape[1]
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        seqs = torch.cat([orig_ids.to(seqs.device), seqs[:, t_short:]], dim=1)
        if isinstance(out, torch.Tensor):
            return seqs
        out.sequences = seqs
        return out

    model.forward = forward
    model.generate = generate

    # log the visual tokens the LLM sees (constant over layers) for the efficiency probe
    def pre_hook(module, args, kwargs):
        if ctx.is_prefill and ctx.visual_mask is not None and ctx.visual_mask.device.type != "meta":
            n = int(ctx.visual_mask.sum(-1).max())
            ctx.visual_tokens_per_layer = [n] * adapter.num_llm_layers

    adapter.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)


# ---- analytic FLOPs -------------------------------------------------------------------------------------
def reduced_vision_macs(vit, schedule: dict[int, int], layers_run: int, overhead) -> int:
    """MACs of one vision-tower pass (one image / crop) with `schedule`: patch embedding, then per
    layer `vit_layer_macs(n_in, n_out)` plus `overhead(layer, n_in, r)` for layers that reduce."""
    from harness.efficiency.analytic import vit_embed_macs, vit_layer_macs

    total = vit_embed_macs(vit)
    for layer, (n_in, n_out) in enumerate(tokens_through_layers(vit.tokens, schedule, layers_run)):
        total += vit_layer_macs(vit, n_in, n_out)
        r = schedule.get(layer, 0)
        if r > 0:
            total += overhead(layer, n_in, r)
    return total


def check_prompt_tokens(method) -> None:
    """Range check of a vision-side method's `prompt_tokens` (a count > 1 or a share in (0, 1])."""
    v = method.prompt_tokens
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (v > 1 and int(v) != v):
        raise MethodError(f"{method.name}: prompt_tokens must be a share in (0, 1] or a whole count > 1, got {v!r}")
    r = method.r if isinstance(method.r, (list, tuple)) else [method.r]
    if method.tokens is not None or any(r):
        raise MethodError(f"{method.name}: give either prompt_tokens or tokens / r, not both")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- the Method plumbing both vision-side methods share ---------------------------------------------
@dataclass(frozen=True)
class VisionGeometry:
    """What a vision-side schedule depends on (read from configs only, so it works on meta models)."""

    num_layers: int  # CLIP layers HF runs
    last_useful: int  # last layer whose output reaches the LLM
    tokens: int  # encoder tokens per image / crop, CLS included
    visual_per_crop: int  # visual tokens one crop gives the LLM unreduced (CLS dropped or not)
    family: str = "llava"

    @classmethod
    def from_adapter(cls, adapter) -> "VisionGeometry":
        return cls(
            num_layers=adapter.num_vision_layers,
            last_useful=adapter.last_useful_vision_layer,
            tokens=adapter.vision_tokens_per_image,
            visual_per_crop=adapter.visual_tokens_per_image,
            family=adapter.family,
        )

    @classmethod
    def from_shapes(cls, shapes) -> "VisionGeometry":
        """Fallback when no adapter was seen: LLaVA defaults (feature layer -2, CLS dropped)."""
        v = shapes.vit
        return cls(num_layers=v.layers, last_useful=v.layers - 2, tokens=v.tokens, visual_per_crop=v.patches)


class VisionReductionMethod(Method):
    """Base for methods that reduce tokens inside CLIP with a per-layer schedule.

    Subclasses (dataclasses) implement `schedule(geom) -> {layer: r}` (raising MethodError for impossible
    budgets), `make_reducer(schedule, adapter) -> VisionReducer` and `overhead_macs(vit, layer, n_in, r)`
    (the MACs of the scoring / merging matmuls their reducer runs in a reducing layer, per crop), and
    have the fields `tokens` (visual tokens per crop) and `prompt_tokens`.

    `prompt_tokens` is a per-prompt budget (`harness.budget.prompt_count`: a count > 1 or a share <= 1
    of the prompt's visual tokens, all images, crops and NeXT newlines): each prompt's crops all get the
    same count k, the one that brings `crops * k` (+ one newline per LLaVA-NeXT image) nearest the
    target without exceeding the prompt's own count, so a prompt ends within crops/2 tokens of it. The
    schedule is then chosen per forward (`tokens = k`)."""

    #: Qwen2-VL: the paper's placement (between attention and MLP of the vision encoder's layers) is not
    #: well defined there, so these methods refuse it rather than move somewhere else silently
    refusals = {
        "qwen2_vl": "its ViT packs images of any size and ends in a 2x2 patch merger that needs every patch of "
        "the grid, so tokens cannot be merged inside the ViT (the paper's placement); use an LLM-side method",
        "qwen2_5_vl": "its ViT packs images of any size, attends inside windows and ends in a 2x2 patch merger that "
        "needs every patch of the grid, so tokens cannot be merged inside the ViT (the paper's placement); use an "
        "LLM-side method",
        "llava_onevision": "its anyres_max packing interpolates each image's unpadded feature grid, which merged tokens "
        "no longer form; use an LLM-side method",
    }

    _geom: VisionGeometry | None = None
    #: a per-prompt target set by a composing method (FiCoCo-VL): n_visual -> visual tokens wanted
    _target_fn = None

    # -- subclass hooks
    def schedule(self, geom: VisionGeometry) -> dict[int, int]:
        raise NotImplementedError

    def make_reducer(self, schedule: dict[int, int], adapter) -> VisionReducer:
        raise NotImplementedError

    def overhead_macs(self, vit, layer: int, n_in: int, r: int) -> int:
        return 0

    # -- per-prompt budgets
    @property
    def per_prompt(self) -> bool:
        return self._target_fn is not None or getattr(self, "prompt_tokens", None) is not None

    def budget_token_params(self, value: float) -> dict:
        return {"prompt_tokens": int(value) if float(value) > 1 else float(value), "tokens": None, "r": 0}

    def prompt_target(self, n_visual: int) -> int:
        from harness.budget import prompt_count

        if self._target_fn is not None:
            return int(self._target_fn(n_visual))
        return prompt_count(self.prompt_tokens, n_visual)

    def min_crop_tokens(self, geom: VisionGeometry) -> int:
        """The fewest visual tokens per crop the method's schedule can leave on this tower (feasibility
        is monotone in k, so a bisection over `schedule_for`). 1 for methods that can remove any number
        in a layer (FiCoCo-V); more for ToMe, whose bipartite matching merges at most half a layer's
        tokens, on a shallow tower."""
        cache = self.__dict__.setdefault("_floor_cache", {})
        if geom not in cache:
            lo, hi = 1, geom.visual_per_crop  # hi is always feasible (nothing removed)
            while lo < hi:
                mid = (lo + hi) // 2
                try:
                    self.schedule_for(geom, mid)
                    hi = mid
                except MethodError:
                    lo = mid + 1
            cache[geom] = lo
        return cache[geom]

    def check_prompt_budget(self, geom: VisionGeometry) -> None:
        """A per-prompt budget must hold on every prompt (README "Budgets"): each crop gets
        k = target / crops, which a count (`prompt_tokens` > 1) drives towards 1 on prompts with many
        images or crops. Where the method cannot go below `min_crop_tokens` > 1 per crop, a count is
        refused here, in one line, before any prompt fails halfway through an evaluation; a share keeps
        k near `share * tokens per crop` on every prompt, so it is checked on the one-image prompt."""
        floor = self.min_crop_tokens(geom)
        value = getattr(self, "prompt_tokens", None)
        if value is not None and float(value) > 1 and floor > 1:
            raise MethodError(
                f"method.params.prompt_tokens={int(value)}: {self.name}: a per-prompt count needs fewer tokens per crop "
                f"on prompts with more images or crops (count / crops), but on this vision tower the method leaves at "
                f"least {floor} of {geom.visual_per_crop} per crop; give the budget as a share (budget.value <= 1, at "
                f"least {floor / geom.visual_per_crop:.3g})"
            )
        self.schedule_for(geom, self.crop_tokens(geom, geom.visual_per_crop, 1, 0))

    def crop_tokens(self, geom: VisionGeometry, n_visual: int, crops: int, n_images: int) -> int:
        """k for one prompt (per-prompt budget): nearest `(target - newlines) / crops`, in [1, per crop],
        never more than the prompt's own `n_visual` in all."""
        newlines = n_images if geom.family == "llava_next" else 0
        crops = max(int(crops), 1)
        target = self.prompt_target(n_visual)
        k = int((target - newlines) / crops + 0.5)
        k = min(k, (n_visual - newlines) // crops, geom.visual_per_crop)
        return max(k, 1)

    def schedule_for(self, geom: VisionGeometry, k: int) -> dict[int, int]:
        """The schedule that leaves k tokens per crop."""
        cache = self.__dict__.setdefault("_sched_cache", {})
        if (geom, k) not in cache:
            import dataclasses

            cache[geom, k] = dataclasses.replace(self, tokens=int(k), r=0, prompt_tokens=None).schedule(geom)
        return cache[geom, k]

    # -- shared
    def removed_per_crop(self, geom: VisionGeometry | None = None) -> int:
        geom = geom or self._geom
        if geom is None:
            raise MethodError(f"method {self.name!r}: call validate(adapter) first (schedule depends on the model)")
        if self.per_prompt:
            raise MethodError(f"method {self.name!r}: a per-prompt budget removes a prompt-dependent count")
        return sum(self.schedule(geom).values())

    def validate(self, adapter) -> None:
        super().validate(adapter)
        try:
            geom = VisionGeometry.from_adapter(adapter)
        except Exception as e:  # e.g. multi-layer vision features
            raise MethodError(f"method {self.name!r}: {e}") from None
        if geom.last_useful < 0 or geom.last_useful >= geom.num_layers:
            raise MethodError(f"method {self.name!r}: vision feature layer leaves no CLIP layer to reduce in")
        if self.per_prompt:  # feasible on every prompt (a count), or on the one-image prompt (a share)
            self.check_prompt_budget(geom)
        else:
            self.schedule(geom)  # raises for impossible budgets
        self._geom = geom

    def apply(self, model, adapter):
        self.validate(adapter)
        geom = self._geom
        if self.per_prompt:
            reducer = self.make_reducer({}, adapter)

            def per_crop(n_visual, crops, n_images):
                k = self.crop_tokens(geom, n_visual, crops, n_images)
                self.schedule_for(geom, k)  # raises (one line) for a k the tower cannot reach
                return k

            def set_tokens(k):
                reducer.schedule = {i: r for i, r in self.schedule_for(geom, k).items() if r > 0}

            patch_vision_layers(model, adapter, reducer, force_layers=set(range(geom.num_layers)))
            install_placeholder_shrink(model, adapter, per_crop, set_tokens)
            return model
        sched = self.schedule(geom)
        if not sched:
            return model  # nothing removed: the model is left untouched (identical logits)
        patch_vision_layers(model, adapter, self.make_reducer(sched, adapter))
        install_placeholder_shrink(model, adapter, geom.visual_per_crop - sum(sched.values()))
        return model

    def visual_tokens_to_llm(self, n_visual: int) -> int:
        """LLaVA-1.5: `n_visual` is a multiple of the per-image count (576); each image loses the same
        number. (LLaVA-NeXT: use `visual_tokens_kept(layout)` - the packing differs.)"""
        geom = self._geom
        if geom is None:
            raise MethodError(f"method {self.name!r}: call validate(adapter) first (schedule depends on the model)")
        images = max(1, n_visual // geom.visual_per_crop)
        if self.per_prompt:
            return images * self.crop_tokens(geom, n_visual, images, images)
        return n_visual - images * self.removed_per_crop()

    def visual_tokens_kept(self, layout) -> int:
        return self.reduced_layout_counts(layout)[2]

    def vision_pass_macs(self, vit, geom: VisionGeometry | None = None, k: int | None = None) -> int:
        geom = geom or self._geom
        sched = self.schedule_for(geom, k) if self.per_prompt else self.schedule(geom)
        return reduced_vision_macs(
            vit, sched, geom.num_layers, lambda layer, n_in, r: self.overhead_macs(vit, layer, n_in, r)
        )

    def reduced_layout_counts(self, layout, geom: VisionGeometry | None = None) -> tuple[int, int, int]:
        """(CLIP passes, tokens through the projector, visual tokens entering the LLM) for a batch-1
        `layout`. LLaVA-NeXT images (`images` = their crops, > 1) enter as `crops * k` tokens plus one
        `image_newline` per image; otherwise (LLaVA-1.5, or a paper-convention layout of whole crops such
        as NeXT's 5 x 576 with images=1) every `visual_per_crop` visual tokens are one pass reduced to k."""
        geom = geom or self._geom
        per = geom.visual_per_crop
        if geom.family == "llava_next" and layout.images > 1:
            passes, newlines = layout.images, layout.n_images
        else:
            passes = layout.visual // per if layout.visual % per == 0 else layout.images
            newlines = 0
        if self.per_prompt:
            k = self.crop_tokens(geom, layout.visual, passes, newlines) if passes else per
        else:
            k = self.keep_per_crop(geom)
        return passes, passes * k, passes * k + newlines

    def keep_per_crop(self, geom: VisionGeometry) -> int:
        """Tokens each CLIP pass keeps without a per-prompt budget (what the merge schedule leaves)."""
        return geom.visual_per_crop - sum(self.schedule(geom).values())

    def analytic_prefill_macs(self, shapes, layout) -> dict[str, int]:
        """`layout.visual` is the unreduced visual count, `layout.images` the CLIP passes (images for
        LLaVA-1.5, crops for LLaVA-NeXT); see `reduced_layout_counts`."""
        from harness.efficiency.analytic import dense_prefill_macs, lm_head_macs, llm_prefill_macs, projector_macs

        geom = self._geom or VisionGeometry.from_shapes(shapes)
        if not self.per_prompt and not self.schedule(geom):  # nothing removed: apply() leaves the model untouched
            return dense_prefill_macs(shapes, layout)
        passes, projected, visual = self.reduced_layout_counts(layout, geom)
        k = projected // passes if passes else geom.visual_per_crop
        return {
            "vision": passes * self.vision_pass_macs(shapes.vit, geom, k),
            "projector": projector_macs(shapes.vit.hidden, shapes.llm.hidden, projected),
            "llm": llm_prefill_macs(shapes.llm, layout.text + visual),
            "lm_head": lm_head_macs(shapes.llm, 1),
        }


__all__ = [
    "VisionGeometry",
    "VisionReducer",
    "VisionReductionMethod",
    "VisionState",
    "ceil_div",
    "gather_tokens",
    "install_placeholder_shrink",
    "last_vision_state",
    "patch_vision_layers",
    "reduced_vision_macs",
    "shrink_placeholders",
    "split_evenly",
    "tokens_through_layers",
]
