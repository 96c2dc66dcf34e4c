"""The embedded default: a class-conditional SD3Transformer2DModel on scikit-learn's digits.

Pixel space, 1 x R x R (R = 16 by default: the 8x8 digits upsampled bilinearly), values in
[-1, 1]. Prompts are "a handwritten digit 3"; the empty prompt is the null class used for
classifier-free guidance (10 % label dropout in pretraining). Conditioning is a learned table
of 4 "text" tokens (``encoder_hidden_states``) plus a pooled vector per class, standing in for
SD3's text encoders, so the backbone is the real diffusers SD3 transformer.

Pretraining is the rectified-flow loss ``||v(x_sigma, sigma, c) - (eps - x0)||^2`` with
logit-normal sigma (SD3's recipe), AdamW, EMA with warm-up; it takes a few minutes on 2 cores
and is cached under ``~/.cache/normguard`` keyed by its settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normguard_core.conventions import interpolate, sample_sigmas, velocity_target
from services.data.digits import NULL_CLASS, digits_dataset, parse_digit_prompt, split_indices
from services.models.base import Condition, FlowGenerator
from services.models.cache import build_once, default_cache_dir

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

__all__ = ["DigitConditioner", "DigitsGenerator", "load_digits_generator", "load_or_pretrain_digits"]

NUM_TOKENS = 4


class SD3Arch(TypedDict):
    """The ``SD3Transformer2DModel`` sizes the embedded tasks fix (the rest come from the task's latents)."""

    num_layers: int
    attention_head_dim: int
    num_attention_heads: int
    joint_attention_dim: int
    caption_projection_dim: int
    pooled_projection_dim: int
    patch_size: int


_ARCH = SD3Arch(
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=128,
    pooled_projection_dim=64,
    patch_size=2,
)
CACHE_VERSION = 1


class DigitConditioner(nn.Module):
    """Class -> (``prompt_embeds (B, 4, 64)``, ``pooled (B, 64)``); class 10 is the null class."""

    def __init__(self, joint_dim: int = 64, pooled_dim: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(NULL_CLASS + 1, NUM_TOKENS * joint_dim)
        self.pooled = nn.Embedding(NULL_CLASS + 1, pooled_dim)
        self.joint_dim = joint_dim

    def forward(self, labels: Tensor) -> Condition:
        tokens = self.tokens(labels).view(labels.shape[0], NUM_TOKENS, self.joint_dim)
        return Condition({"prompt_embeds": tokens, "pooled": self.pooled(labels)})


def build_digits_transformer(resolution: int = 16) -> SD3Transformer2DModel:
    """The SD3 transformer of the embedded default (2.3 M parameters at R = 16)."""
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=resolution, in_channels=1, out_channels=1, pos_embed_max_size=resolution, **_ARCH
    )


def sd3_backbone_call(module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
    """One SD3Transformer2DModel call in our convention (diffusers' timestep = 1000 * sigma)."""
    return module(
        hidden_states=x,
        timestep=sigma * 1000.0,
        encoder_hidden_states=cond.tensors["prompt_embeds"],
        pooled_projections=cond.tensors["pooled"],
        return_dict=False,
    )[0]


class DigitsGenerator(FlowGenerator):
    """The embedded default generator (see the module docstring)."""

    name = "digits"

    def __init__(
        self, transformer: ModelMixin, conditioner: DigitConditioner, *, resolution: int = 16, **kwargs: Any
    ) -> None:
        super().__init__(transformer, **kwargs)
        self.conditioner = conditioner.to(self.device).eval().requires_grad_(False)
        self.resolution = resolution

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, self.resolution, self.resolution)

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        labels = torch.tensor([parse_digit_prompt(p) for p in prompts], dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.conditioner(labels)

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"digits latents must be (B, {', '.join(map(str, self.latent_shape))}), got {tuple(latents.shape)}"
            )
        return ((latents.float().clamp(-1, 1) + 1.0) / 2.0).repeat(1, 3, 1, 1)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        return sd3_backbone_call(module, x, sigma, cond)


def _cache_key(resolution: int, steps: int, seed: int) -> str:
    blob = json.dumps(dict(arch=_ARCH, resolution=resolution, steps=steps, seed=seed, v=CACHE_VERSION), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain_digits(
    *,
    resolution: int = 16,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[SD3Transformer2DModel, DigitConditioner]:
    """Rectified-flow pretraining on the digits train split; returns EMA weights.

    The EMA decay warms up as ``min(0.999, (1 + k) / (10 + k))`` so that short runs are not
    dominated by the random initialisation.
    """
    torch.manual_seed(seed)
    images, labels = digits_dataset(resolution)
    train_idx, _ = split_indices(len(labels))
    images, labels = images[train_idx], labels[train_idx]
    model, cond = build_digits_transformer(resolution), DigitConditioner()
    ema_model, ema_cond = build_digits_transformer(resolution), DigitConditioner()
    ema_model.load_state_dict(model.state_dict())
    ema_cond.load_state_dict(cond.state_dict())
    params = list(model.parameters()) + list(cond.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < 0.1] = NULL_CLASS  # label dropout for CFG
        eps = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(batch_size, generator=gen)
        v = sd3_backbone_call(model, interpolate(x0, eps, sigma), sigma, cond(y))
        loss = F.mse_loss(v, velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1.0 + k) / (10.0 + k))
        with torch.no_grad():
            for ema, cur in ((ema_model, model), (ema_cond, cond)):
                for pe, pc in zip(ema.parameters(), cur.parameters()):
                    pe.lerp_(pc, 1.0 - decay)
        if progress is not None:
            progress(k, float(loss.detach()))
    return ema_model.eval(), ema_cond.eval()


def load_or_pretrain_digits(
    *,
    resolution: int = 16,
    steps: int = 600,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Path of the cached pretrained digits model, pretraining it first if needed (atomic write)."""
    root = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
    target = root / f"digits-{_cache_key(resolution, steps, seed)}"

    def build(tmp: Path) -> dict:
        log(f"pretraining the embedded digits generator ({steps} steps, cached at {target}) ...")
        t0 = time.time()

        def progress(k: int, loss: float) -> None:
            if (k + 1) % max(1, steps // 10) == 0:
                log(f"  pretrain step {k + 1}/{steps}  loss {loss:.4f}  ({time.time() - t0:.0f} s)")

        model, cond = pretrain_digits(resolution=resolution, steps=steps, seed=seed, progress=progress)
        model.save_pretrained(tmp / "transformer")
        torch.save(cond.state_dict(), tmp / "conditioner.pt")
        return dict(resolution=resolution, steps=steps, seed=seed, v=CACHE_VERSION, seconds=round(time.time() - t0, 1))

    return build_once(target, build)


def load_digits_generator(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
) -> DigitsGenerator:
    """Load a cached digits model directory as a generator."""
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no digits model at {path} (expected meta.json, transformer/, conditioner.pt)")
    meta = json.loads((path / "meta.json").read_text())
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer")
    cond = DigitConditioner()
    cond.load_state_dict(torch.load(path / "conditioner.pt", map_location="cpu", weights_only=True))
    return DigitsGenerator(
        transformer,
        cond,
        resolution=meta["resolution"],
        device=device,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
    )
