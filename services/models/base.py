"""The generator interface the Ray services use, and the diffusers-transformer base.

A generator turns prompts into conditions, (x, sigma, condition) into velocities in the
convention of ``normguard_core.conventions``, and latents into images in [0, 1], and owns its
family's sampling grid (``schedule``, ``services.models.schedules``). Its reference is the same
model with LoRA adapters disabled (no second copy), or a frozen copy of the initial weights for
full fine-tuning.

Precision: what trains (the LoRA adapters, or the whole transformer) is float32, so AdamW's moments
are too, as in DiffusionNFT's ``scripts/train_nft_sd3.py`` and flow_grpo's ``scripts/train_sd3.py``.
With a lower ``compute_dtype`` the frozen base (or the full fine-tune's reference copy) stays in that
dtype and the pipelines run their forwards under ``torch.autocast``, with the timestep in float32
(see ``services.models.pipelines``). That bf16 base is our choice, for memory: both sources load the
whole transformer in float32 (``compute_dtype`` float32 is theirs). Samplers and serving replicas
build through here too, so a full fine-tune's sampler holds a float32 copy of what trains (known
cost, counted by neither the sources' layout nor, yet, ``normguard plan``'s sampler row).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from normguard_core.samplers import VelocityFn, cfg_combine
from services.models.schedules import FlowSchedule

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

__all__ = ["Condition", "FlowGenerator"]


@dataclass(frozen=True)
class Condition:
    """Prompt conditioning: named tensors sharing batch dim 0 (e.g. ``prompt_embeds (B, L, C)``)."""

    tensors: dict[str, Tensor]

    @property
    def batch_size(self) -> int:
        """B."""
        return next(iter(self.tensors.values())).shape[0]

    def index(self, idx: Tensor) -> Condition:
        """Rows ``idx`` of every tensor."""
        return Condition({k: v[idx] for k, v in self.tensors.items()})

    def slice(self, rows: slice) -> Condition:
        """Rows ``rows`` of every tensor (views)."""
        return Condition({k: v[rows] for k, v in self.tensors.items()})

    def repeat_interleave(self, n: int) -> Condition:
        """Each row repeated ``n`` times (prompt -> group of samples)."""
        return Condition({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    def cat(self, other: Condition) -> Condition:
        """Concatenate along the batch (for batched CFG)."""
        return Condition({k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> Condition:
        """Move every tensor."""
        return Condition({k: v.to(device) for k, v in self.tensors.items()})


@runtime_checkable
class _PeftAdapters(Protocol):
    """diffusers' ``PeftAdapterMixin``, the part LoRA training uses."""

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None: ...

    def disable_adapters(self) -> None: ...

    def enable_adapters(self) -> None: ...


def _adapters(transformer: nn.Module) -> _PeftAdapters:
    if not isinstance(transformer, _PeftAdapters):
        raise TypeError(
            "LoRA needs a transformer with peft adapters (diffusers' PeftAdapterMixin), "
            f"got {type(transformer).__name__}"
        )
    return transformer


class FlowGenerator:
    """Base of the diffusers-transformer generators: trainable backbone, reference, guidance.

    Subclasses implement ``_call_backbone`` (one model call), ``encode_prompts``,
    ``decode`` and ``latent_shape``.
    """

    name = "base"
    schedule = FlowSchedule()  # the digits grid; the pipelines' comes from their scheduler config
    compute_dtype = torch.float32  # the frozen weights' dtype and the autocast dtype of the forwards
    batched_cfg = True  # CFG's conditional and null rows in one transformer call; False: two calls

    def __init__(
        self,
        transformer: ModelMixin,
        *,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        # diffusers wraps ModelMixin.to in functools.wraps, whose typeshed _Wrapped is not bound as a method
        self.transformer = transformer.to(self.device)  # pyright: ignore[reportArgumentType]
        self.lora_rank = lora_rank
        self._reference: nn.Module | None = None
        if lora_rank is not None:
            from peft import LoraConfig

            self.transformer.requires_grad_(False)
            cfg = LoraConfig(
                r=lora_rank,
                # peft annotates lora_alpha int but only divides by it (scaling = lora_alpha / r): a float is fine
                lora_alpha=cast(int, lora_alpha or lora_rank),
                target_modules=list(lora_targets),
                init_lora_weights=True,
            )
            _adapters(self.transformer).add_adapter(cfg)  # peft casts the adapters to the base layer's dtype
        else:
            self._reference = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        for p in self.trainable_parameters():  # train in float32 (a no-op for a float32 model)
            p.data = p.data.float()
        self.transformer.eval()

    # ---- model-specific -------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample latent shape ``*D``."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        """Condition for each prompt (``""`` is the unconditional prompt)."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """``(B, *D)`` latents -> ``(B, 3, H, W)`` images in [0, 1]."""
        raise NotImplementedError

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------
    def sigma_grid(self, num_steps: int, shift: float | None = None) -> Tensor:
        """``(T + 1,)`` sampling grid of this family (``shift``: a static override, ``None`` = the scheduler's)."""
        return self.schedule.sigma_grid(num_steps, shift=shift)

    def cfg_scale(self, guidance_scale: float) -> float:
        """The CFG scale this model applies for a requested ``guidance_scale`` (the requested one by default; a
        step-distilled model that ignores guidance: 1)."""
        return guidance_scale

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to ``compute_dtype`` on this device, or nothing at float32 (bit-identical)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the learner optimises (LoRA weights, or the whole transformer)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What weight sync ships: the LoRA tensors only, or the full transformer (CPU copies)."""
        names = {n for n, p in self.transformer.named_parameters() if p.requires_grad}
        return {n: t.detach().cpu().clone() for n, t in self.transformer.state_dict().items() if n in names}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load weights produced by :meth:`trainable_state_dict` (strict on the given names)."""
        own = self.transformer.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"weights for unknown parameters: {unknown[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))

    @contextlib.contextmanager
    def _reference_module(self) -> Iterator[nn.Module]:
        if self._reference is not None:
            yield self._reference
            return
        adapters = _adapters(self.transformer)
        adapters.disable_adapters()
        try:
            yield self.transformer
        finally:
            adapters.enable_adapters()

    def velocity(
        self, x: Tensor, sigma: Tensor, cond: Condition, *, reference: bool = False, module: nn.Module | None = None
    ) -> Tensor:
        """Velocity ``(B, *D)`` at ``(x (B, *D), sigma (B,), cond)``.

        Args:
            x: state.
            sigma: per-sample sigma.
            cond: condition with batch B.
            reference: use the frozen reference (always under ``no_grad``).
            module: the policy module to call (e.g. a DDP wrapper of ``transformer``).
        """
        if reference:
            with torch.no_grad(), self._reference_module() as ref:
                return self._call_backbone(ref, x, sigma, cond).float()
        return self._call_backbone(module or self.transformer, x, sigma, cond).float()

    def velocity_fns(
        self, prompts: Sequence[str], guidance_scale: float = 1.0, *, micro_batch: int | None = None
    ) -> tuple[VelocityFn, VelocityFn]:
        """``(policy, reference)`` ``(x, sigma) -> v`` closures for ``prompts`` with CFG (the null prompt
        is encoded only when ``guidance_scale != 1``); the prompts are encoded once for both.
        ``micro_batch``: samples per transformer call (see :meth:`guided_velocity_fn`)."""
        guidance_scale = self.cfg_scale(guidance_scale)
        cond = self.encode_prompts(list(prompts))
        null = self.encode_prompts([""] * len(prompts)) if guidance_scale != 1.0 else None
        return (
            self.guided_velocity_fn(cond, null, guidance_scale, micro_batch=micro_batch),
            self.guided_velocity_fn(cond, null, guidance_scale, reference=True, micro_batch=micro_batch),
        )

    def guided_velocity_fn(
        self,
        cond: Condition,
        null_cond: Condition | None,
        guidance_scale: float,
        *,
        reference: bool = False,
        micro_batch: int | None = None,
    ) -> VelocityFn:
        """A ``(x, sigma) -> v`` closure with CFG, batching conditional and null passes together.

        ``micro_batch`` splits the batch into chunks of that many samples, one transformer call each (with
        CFG a call carries the chunk's conditional and null rows, ``2 * micro_batch``); ``None`` = the whole
        batch in one call. Rows do not interact, so the result is the same (bit-identical where the kernels
        do not depend on the batch size, as on CPU); the SDE noise and the steps stay whole-batch.
        """
        if micro_batch is None or micro_batch >= cond.batch_size:
            return self._guided(cond, null_cond, guidance_scale, reference)
        chunks = [
            (
                sl,
                self._guided(
                    cond.slice(sl), None if null_cond is None else null_cond.slice(sl), guidance_scale, reference
                ),
            )
            for sl in (slice(i, i + micro_batch) for i in range(0, cond.batch_size, micro_batch))
        ]

        def fn(x: Tensor, sigma: Tensor) -> Tensor:
            return torch.cat([part(x[sl], sigma[sl]) for sl, part in chunks])

        return fn

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
        """The family's guidance from its conditional and null velocities: CFG's ``v_u + w (v_c - v_u)``
        (``cfg_combine``) unless the family's pipeline does something else (Qwen-Image's norm rescale)."""
        return cfg_combine(v_cond, v_uncond, guidance_scale)

    def _guided(
        self, cond: Condition, null_cond: Condition | None, guidance_scale: float, reference: bool
    ) -> VelocityFn:
        if guidance_scale == 1.0 or null_cond is None:
            return lambda x, sigma: self.velocity(x, sigma, cond, reference=reference)
        if not self.batched_cfg:  # two transformer calls, as the family's pipeline makes them

            def apart(x: Tensor, sigma: Tensor) -> Tensor:
                v_cond = self.velocity(x, sigma, cond, reference=reference)
                v_uncond = self.velocity(x, sigma, null_cond, reference=reference)
                return self.combine_guidance(v_cond, v_uncond, guidance_scale)

            return apart
        both = cond.cat(null_cond)

        def fn(x: Tensor, sigma: Tensor) -> Tensor:
            v = self.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both, reference=reference)
            v_cond, v_uncond = v.chunk(2)
            return self.combine_guidance(v_cond, v_uncond, guidance_scale)

        return fn

    def decode_chunked(self, latents: Tensor, decode_batch: int | None = None) -> Tensor:
        """:meth:`decode` in chunks of ``decode_batch`` latents (``None``: one call), concatenated."""
        if decode_batch is None or decode_batch >= latents.shape[0]:
            return self.decode(latents)
        return torch.cat([self.decode(part) for part in latents.split(decode_batch)])
