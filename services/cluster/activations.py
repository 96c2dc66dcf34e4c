"""Activation memory of the real transformers and VAE, counted on the meta device (``normguard plan``).

Nothing here is a formula: the published architecture (``deploy/architectures``) is built on
``torch.device("meta")`` (no storage), with the family's LoRA adapters attached the way
``services.models.base.FlowGenerator`` attaches them (frozen base in the model dtype, float32
adapters), and one forward is run at one sample:

* **saved for backward** (a learner's ``v_theta``): the bytes of every tensor autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``), each *storage* counted once (a view, or one input
  saved by the q / k / v projections, is the same storage; meta storages keep their identity), less
  the parameters' and the inputs' own storages;
* **no-grad transient** (a rollout's, a reference forward's, a VAE decode's): the peak of the bytes of
  live intermediate storages, op by op (a ``TorchDispatchMode`` that sees every op's outputs and a
  weak reference that sees each one freed), less the weights and inputs, which are there anyway.

The GPU's mixed precision is reproduced, not CPU's: ``FlowGenerator`` runs its forwards under
``torch.autocast(cuda, bfloat16)``, whose casting lists differ from CPU autocast's (on CUDA
``layer_norm``, ``softmax``, ``pow``, ``rsqrt``, ``sum``... run in float32). CUDA autocast cannot run
without CUDA, so :class:`CudaAutocast` applies CUDA's lists (PyTorch's "Autocast Op Reference", CUDA
ops that autocast to float16 / float32) at the ``__torch_function__`` level, which is above autograd
as the real autocast dispatch key is; like autocast it casts a float32 leaf that requires grad (a
LoRA weight) once per region. ``scaled_dot_product_attention`` becomes FlashAttention's op
(``aten._scaled_dot_product_flash_attention``, what a recent GPU runs for bf16 without a mask), which
saves q, k, v, the output and the log-sum-exp, not the ``L x L`` weights of the math kernel a meta
tensor would otherwise get.

Limits, stated: the count is of one micro-batch's forward; allocator fragmentation, CUDA workspaces
(cuBLAS, FlashAttention's backward scratch) and the gradients of activations during backward are not
in it (the plan adds a no-grad-forward transient on top, see ``services.cluster.memory``). Activations
scale exactly linearly with the batch (every intermediate has the batch as a dimension), so one
sample is measured and multiplied. Other kernels (cuDNN attention, memory-efficient attention) save
the same O(L) tensors up to padding. ``tests/services/test_plan_memory.py`` checks both counts against
a real CPU forward and backward of a tiny SD3 (float32, real storages, dedup by data pointer).
"""

from __future__ import annotations

import copy
import functools
import json
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from services.config.families import architecture

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

__all__ = [
    "CudaAutocast",
    "LivePeak",
    "TransformerBytes",
    "build_transformer",
    "measure",
    "saved_bytes",
    "transformer_bytes",
    "transformer_inputs",
    "vae_decode_bytes",
]

ARCH = Path(__file__).resolve().parents[2] / "deploy" / "architectures"
# PyTorch "Autocast Op Reference" (torch.amp docs), CUDA: ops that autocast to the lower precision ...
_CUDA_LOW = frozenset(
    "linear matmul __matmul__ __rmatmul__ mm bmm baddbmm addmm addbmm addmv addr mv chain_matmul multi_dot prelu "
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d scaled_dot_product_attention".split()
)
# ... and to float32 (the reductions, norms and transcendental functions of the list).
_CUDA_FP32 = frozenset(
    "__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin cosh sinh tan erfinv exp expm1 log log10 log1p log2 pow "
    "reciprocal rsqrt cumprod cumsum prod sum norm normalize renorm dist cdist pdist cosine_similarity softmax "
    "softmin log_softmax softplus layer_norm group_norm mse_loss l1_loss smooth_l1_loss kl_div cross_entropy "
    "nll_loss binary_cross_entropy_with_logits".split()
)


class CudaAutocast(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)``'s casts, on tensors of any device (meta, CPU); ``flash=False`` keeps
    the device's own attention kernel."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, *, flash: bool = True) -> None:
        super().__init__()
        self.dtype, self.flash, self._cache = dtype, flash, {}

    def _cast(self, to: torch.dtype) -> Callable[[object], object]:
        def one(t: object) -> object:
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()) or t.dtype in (to, torch.float64):
                return t
            if t.is_leaf and t.requires_grad:  # autocast caches a leaf's cast for the region
                key = (id(t), to)
                if key not in self._cache:
                    self._cache[key] = (t, t.to(to))
                return self._cache[key][1]
            return t.to(to)

        return one

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kw: dict[str, Any] = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _CUDA_LOW:
            args, kw = tree_map(self._cast(self.dtype), (args, kw))
        elif name in _CUDA_FP32:
            args, kw = tree_map(self._cast(torch.float32), (args, kw))
        if self.flash and name == "scaled_dot_product_attention" and kw.get("attn_mask") is None:
            q, k, v = (*args, *(kw[n] for n in ("query", "key", "value") if n in kw))[:3]
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, kw.get("dropout_p", 0.0), kw.get("is_causal", False), scale=kw.get("scale")
            )
            return out[0]
        return func(*args, **kw)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def saved_bytes(fn: Callable[[], object], *, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, less those of ``exclude``."""
    skip = {_storage_key(t) for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out  # the saved storages stay referenced by the graph until here, so no key was reused
    return sum(seen.values())


class LivePeak(TorchDispatchMode):
    """The peak of the bytes of live storages created by the ops run under it (``peak``); storages of the
    ``exclude`` tensors (weights, inputs: a view of a buffer is no new memory) are not counted."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.skip = {_storage_key(t) for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, live tensors on it]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (key := _storage_key(t)) not in self.skip:
                entry = self.live.get(key)
                if entry is None:
                    entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.now += entry[0]
                    self.peak = max(self.peak, self.now)
                entry[1] += 1
                weakref.finalize(t, self._release, key)
        return out


def _peak(fn: Callable[[], object], *, exclude: list[torch.Tensor]) -> int:
    with torch.no_grad(), LivePeak(exclude) as live:
        out = fn()
    del out
    return live.peak


# ---- the real models ------------------------------------------------------------------------
def _config(family: str, what: str, model_dir: str | None = None) -> dict:
    """``what`` (``transformer`` / ``vae``) config: the staged pipeline's own when ``model_dir`` has it, else
    the published one in ``deploy/architectures`` (SD3-medium: SD3.5-M's blocks without the second
    attention and the qk-norm, its ``pos_embed_max_size`` 192)."""
    local = Path(model_dir) / what / "config.json" if model_dir else None
    if local is not None and local.is_file():
        return json.loads(local.read_text())
    directory, overrides = architecture(family, what)  # services.config.families: the published folder
    config = json.loads((ARCH / directory / f"{what}_config.json").read_text())
    config.update(copy.deepcopy(dict(overrides)))
    return config


def build_transformer(config: dict, dtype: torch.dtype, lora_rank: int | None, targets: tuple[str, ...]) -> ModelMixin:
    """The transformer of ``config`` (its ``_class_name``) as ``FlowGenerator`` holds it, on the current default
    device: the base in ``dtype``, the LoRA adapters (or, without LoRA, the whole transformer: it trains) in
    float32."""
    import diffusers

    tr = getattr(diffusers, config["_class_name"]).from_config(config).to(dtype)
    if lora_rank:
        from peft import LoraConfig

        tr.requires_grad_(False)
        tr.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(targets)))
    for p in tr.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return tr.train()


def _frames(latent_frames: int) -> dict:
    """The hooks' ``latent_frames`` keyword, given to a video family's hooks only (an image family's take none)."""
    return {"latent_frames": latent_frames} if latent_frames != 1 else {}


def transformer_inputs(
    tr: ModelMixin, latent_side: int, text_tokens: int, device: str | torch.device = "meta", *, latent_frames: int = 1
) -> dict:
    """One sample's keyword arguments, as the generator of the family whose ``transformer_class`` ``tr`` is passes
    them (``ModelFamily.plan_inputs``; ``latent_frames``: a video family's)."""
    from services.models.families import family_of_transformer

    fam = family_of_transformer(type(tr).__name__)
    return fam.plan_inputs(tr, latent_side, text_tokens, device, **_frames(latent_frames))


@dataclass(frozen=True)
class TransformerBytes:
    """Per-sample bytes of one transformer call (one row: CFG's null row is a second one).

    Attributes:
        saved: saved for backward by a forward with grad (the learner's ``v_theta``).
        no_grad_peak: peak of live intermediates of a forward under ``no_grad`` (rollouts, ``v_ref``).
        recompute: with activation checkpointing (``saved`` then holds the checkpointed blocks' inputs), what the
            backward re-materialises beside them: the largest block's saved activations; 0 without.
    """

    saved: int
    no_grad_peak: int
    recompute: int = 0


def measure(tr: ModelMixin, kwargs: dict, dtype: torch.dtype, *, flash: bool = True) -> TransformerBytes:
    """Both counts of one call ``tr(**kwargs)`` (any device), under the GPU's autocast for ``dtype``
    (``flash=False``: the device's own attention kernel, for a real CPU forward)."""
    exclude = [*tr.parameters(), *tr.buffers(), *(t for t in kwargs.values() if isinstance(t, torch.Tensor))]
    with CudaAutocast(dtype, flash=flash):  # float32: no casts (FlowGenerator runs no autocast)
        saved = saved_bytes(lambda: tr(**kwargs)[0], exclude=exclude)
    with CudaAutocast(dtype, flash=flash):
        peak = _peak(lambda: tr(**kwargs)[0], exclude=exclude)
    return TransformerBytes(saved=saved, no_grad_peak=peak)


@functools.lru_cache(maxsize=16)
def transformer_bytes(
    family: str,
    *,
    resolution: int,
    text_tokens: int,
    dtype: str,
    lora_rank: int | None,
    targets: tuple[str, ...],
    model_dir: str | None = None,
    latent_frames: int = 1,
    checkpointing: bool = False,
) -> TransformerBytes:
    """One sample of ``family`` (``sd3`` / ``sd3.5-medium`` / ``sd3.5-large`` / ``flux``), measured on meta
    (SD3.5-M at 512 px: ~30 s on two busy cores, FLUX ~15 s; cached per process); ``latent_frames``: a video's; ``checkpointing``: with
    the transformer's activation checkpointing (``model.gradient_checkpointing``), measured once more."""
    with torch.device("meta"):
        tr = build_transformer(_config(family, "transformer", model_dir), getattr(torch, dtype), lora_rank, targets)
    inputs = transformer_inputs(tr, resolution // 8, text_tokens, latent_frames=latent_frames)
    full = measure(tr, inputs, getattr(torch, dtype))
    if not checkpointing:
        return full
    largest = _largest_block_saved(tr, inputs, getattr(torch, dtype))
    tr.enable_gradient_checkpointing()  # diffusers' own (non-reentrant): the blocks keep only their inputs
    ckpt = measure(tr, inputs, getattr(torch, dtype))
    return TransformerBytes(saved=ckpt.saved, no_grad_peak=ckpt.no_grad_peak, recompute=largest)


def _largest_block_saved(tr: ModelMixin, inputs: dict, dtype: torch.dtype) -> int:
    """The most bytes one of ``tr``'s checkpointable blocks saves for backward (less its weights and inputs):
    one forward with grad through diffusers' checkpointing hook, each block measured instead of checkpointed."""
    sizes: list[int] = []

    def probe(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out: list = []
        given = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        sizes.append(saved_bytes(lambda: out.append(fn(*args, **kwargs)), exclude=[*tr.parameters(), *given]))
        return out[0]

    tr.enable_gradient_checkpointing(gradient_checkpointing_func=probe)
    with CudaAutocast(dtype, flash=True):
        tr(**inputs)
    tr.disable_gradient_checkpointing()
    if not sizes:
        raise ValueError(f"{type(tr).__name__} checkpoints no block: model.gradient_checkpointing cannot apply")
    return max(sizes)


@functools.lru_cache(maxsize=8)
def vae_decode_bytes(
    family: str, *, resolution: int, dtype: str, model_dir: str | None = None, latent_frames: int = 1
) -> int:
    """Peak live bytes of decoding one latent at ``resolution`` px with the VAE of ``family`` (``model.kind``; the
    config's ``_class_name``, ``AutoencoderKL`` by default; the latent ``ModelFamily.plan_vae_latent``), weights
    in ``dtype``, no autocast, as ``services.models.families.pipeline.vae_decode`` runs it."""
    import diffusers

    from services.models.families import family as family_of

    torch_dtype = getattr(torch, dtype)
    config = _config(family, "vae", model_dir)
    with torch.device("meta"):
        vae = getattr(diffusers, config.get("_class_name", "AutoencoderKL")).from_config(config)
        vae = vae.to(torch_dtype).eval()
    z = family_of(family).plan_vae_latent(vae, resolution // 8, torch_dtype, **_frames(latent_frames))
    exclude = [*vae.parameters(), *vae.buffers(), z]
    with CudaAutocast(torch_dtype):  # only the SDPA redirect acts: every tensor is already in dtype
        return _peak(lambda: vae.decode(z, return_dict=False)[0], exclude=exclude)
