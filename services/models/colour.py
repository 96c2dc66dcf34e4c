"""The colour task's generator: an SD3Transformer2DModel in the latent space of a small VAE.

The mechanics of the real setting at toy scale (``services.data.colour`` has the data): images
(3 x 32 x 32) are generated as 4 x 8 x 8 latents of a diffusers ``AutoencoderKL`` normalised as SD3's
(``services.models.colour_vae``), the backbone is diffusers' SD3 transformer (patch 2, so 16 image
tokens, as SD3 patches its latents by 2), and prompts condition it through a learned token table
standing in for the text encoders: one token per attribute (shape, colour, background, each with its
own null entry) plus a learned prefix token as ``encoder_hidden_states`` (``(B, 4, 64)``), and the sum
of per-attribute pooled vectors as ``pooled_projections`` (``(B, 64)``). 10 % of the training prompts
are the null prompt ``""`` (all attributes null) for classifier-free guidance.

Pretraining: the VAE first (``colour_vae.train_vae``, then SD3's shift / scale from the data), then the
rectified-flow loss ``||v(x_sigma, sigma, c) - (eps - x0)||^2`` on the normalised latents of a fixed
training set with logit-normal sigma, AdamW, gradient clipping and an EMA with warm-up (as the digits
model). Everything is cached under ``$NORMGUARD_CACHE`` (default ``~/.cache/normguard``) keyed by the
settings. Measured alone under the shared lock on the development machine's 2 CPU cores (torch threads
2): VAE 800 steps at batch 32 in 218 s (final loss, with its colour term, about 0.13), latent shift 0.698
and scale 0.412 (latent std 1.002 after normalisation); transformer 1200 steps at batch 128 in 210 s (loss
0.40 at step 1200). ``services.prepare_colour`` has the scorers' and the total times.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normguard_core.conventions import interpolate, sample_sigmas, velocity_target
from services.data.colour import NULL_LABEL, TRAIN_SEED, colour_dataset, parse_colour_prompt
from services.hub import to_device
from services.models.base import Condition, FlowGenerator
from services.models.cache import build_once, default_cache_dir
from services.models.colour_vae import VAE_ARCH, build_colour_vae, decode_latents, encode_images
from services.models.digits import SD3Arch, sd3_backbone_call

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

__all__ = [
    "ColourConditioner",
    "ColourGenerator",
    "colour_cache_path",
    "load_colour_generator",
    "load_or_pretrain_colour",
]

LATENT_SHAPE = (4, 8, 8)
NUM_TOKENS = 4
_ARCH = SD3Arch(
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=128,
    pooled_projection_dim=64,
    patch_size=2,
)
CACHE_VERSION = 3  # 2: the VAE's colour term, batch 32, lr 1e-3 (colour_vae); 3: built on one thread (BUILD_THREADS)
NUM_TRAIN_IMAGES = 8192
DEFAULT_GUIDANCE = 4.0  # the CFG scale at which the base model is recognisable (module docstring)


class ColourConditioner(nn.Module):
    """Labels ``(B, 3)`` -> (``prompt_embeds (B, 4, 64)``, ``pooled (B, 64)``); index ``NULL_LABEL[k]`` is null."""

    def __init__(self, joint_dim: int = 64, pooled_dim: int = 64) -> None:
        super().__init__()
        self.tokens = nn.ModuleList(nn.Embedding(k + 1, joint_dim) for k in NULL_LABEL)
        self.pooled = nn.ModuleList(nn.Embedding(k + 1, pooled_dim) for k in NULL_LABEL)
        self.prefix = nn.Parameter(torch.randn(1, 1, joint_dim) * 0.02)

    def forward(self, labels: Tensor) -> Condition:
        attr = torch.stack([emb(labels[:, k]) for k, emb in enumerate(self.tokens)], dim=1)  # (B, 3, C)
        tokens = torch.cat([self.prefix.expand(labels.shape[0], -1, -1), attr], dim=1)  # (B, 4, C)
        pooled = functools.reduce(operator.add, [emb(labels[:, k]) for k, emb in enumerate(self.pooled)])  # (B, P)
        return Condition({"prompt_embeds": tokens, "pooled": pooled})


def build_colour_transformer() -> SD3Transformer2DModel:
    """The SD3 transformer of the colour task (2.3 M parameters, 16 tokens of 2 x 2 x 4 latents)."""
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    side = LATENT_SHAPE[1]
    return SD3Transformer2DModel(
        sample_size=side, in_channels=LATENT_SHAPE[0], out_channels=LATENT_SHAPE[0], pos_embed_max_size=side, **_ARCH
    )


def prompt_labels(prompts: Sequence[str]) -> Tensor:
    """``(B, 3)`` attribute indices of the prompts (``""``: all null)."""
    return torch.tensor([parse_colour_prompt(p) for p in prompts], dtype=torch.long)


class ColourGenerator(FlowGenerator):
    """The colour task's generator (see the module docstring); ``decode`` runs the VAE."""

    name = "colour"

    def __init__(
        self, transformer: ModelMixin, conditioner: ColourConditioner, vae: AutoencoderKL, **kwargs: Any
    ) -> None:
        super().__init__(transformer, **kwargs)
        self.conditioner = conditioner.to(self.device).eval().requires_grad_(False)
        self.vae = to_device(vae, self.device).eval().requires_grad_(False)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return LATENT_SHAPE

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        with torch.no_grad():
            return self.conditioner(prompt_labels(prompts).to(self.device))

    def decode(self, latents: Tensor) -> Tensor:
        """``(B, 4, 8, 8)`` normalised latents -> ``(B, 3, 32, 32)`` images in [0, 1] through the VAE."""
        if latents.ndim != 4 or tuple(latents.shape[1:]) != LATENT_SHAPE:
            raise ValueError(f"colour latents must be (B, 4, 8, 8), got {tuple(latents.shape)}")
        with torch.no_grad():
            images = decode_latents(self.vae, latents.to(self.device).float())  # (B, 3, 32, 32) in ~[-1, 1]
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        return sd3_backbone_call(module, x, sigma, cond)


def _ema_update(pairs: Sequence[tuple[nn.Module, nn.Module]], decay: float) -> None:
    with torch.no_grad():
        for ema, cur in pairs:
            for pe, pc in zip(ema.parameters(), cur.parameters()):
                pe.lerp_(pc, 1.0 - decay)


def pretrain_colour_transformer(
    latents: Tensor,
    labels: Tensor,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[SD3Transformer2DModel, ColourConditioner]:
    """Rectified flow on ``latents (N, 4, 8, 8)`` with ``labels (N, 3)``; returns the EMA weights.

    EMA decay ``min(0.999, (1 + k) / (10 + k))`` (warm-up, as the digits model); 10 % null prompts.
    """
    torch.manual_seed(seed)
    model, cond = build_colour_transformer(), ColourConditioner()
    ema_model, ema_cond = build_colour_transformer(), ColourConditioner()
    ema_model.load_state_dict(model.state_dict())
    ema_cond.load_state_dict(cond.state_dict())
    params = list(model.parameters()) + list(cond.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    null = torch.tensor(NULL_LABEL)
    for k in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x0, y = latents[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < 0.1] = null  # prompt dropout for CFG
        eps = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(batch_size, generator=gen)
        v = sd3_backbone_call(model, interpolate(x0, eps, sigma), sigma, cond(y))
        loss = F.mse_loss(v, velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(((ema_model, model), (ema_cond, cond)), min(0.999, (1.0 + k) / (10.0 + k)))
        if progress is not None:
            progress(k, float(loss.detach()))
    return ema_model.eval(), ema_cond.eval()


def _cache_key(vae_steps: int, steps: int, seed: int) -> str:
    blob = dict(arch=_ARCH, vae=VAE_ARCH, vae_steps=vae_steps, steps=steps, seed=seed, n=NUM_TRAIN_IMAGES)
    return hashlib.sha256(json.dumps({**blob, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:12]


def _logger(what: str, steps: int, log: Callable[[str], None]) -> Callable[[int, float], None]:
    t0 = time.time()

    def progress(k: int, loss: float) -> None:
        if (k + 1) % max(1, steps // 10) == 0:
            log(f"  {what} step {k + 1}/{steps}  loss {loss:.4f}  ({time.time() - t0:.0f} s)")

    return progress


def _train_all(tmp: Path, *, vae_steps: int, steps: int, seed: int, log: Callable[[str], None]) -> dict:
    """Train the VAE and the transformer into ``tmp``; returns the timings for ``meta.json``."""
    from services.models.colour_vae import set_latent_normalisation, train_vae

    images, labels = colour_dataset(NUM_TRAIN_IMAGES, TRAIN_SEED)
    t0 = time.time()
    torch.manual_seed(seed)
    vae = train_vae(
        build_colour_vae(), images, steps=vae_steps, batch_size=32, lr=1e-3, seed=seed,
        progress=_logger("vae", vae_steps, log),
    )  # fmt: skip
    shift, scale = set_latent_normalisation(vae, images[:2048])
    latents = encode_images(vae, images, seed=seed)
    t_vae = time.time() - t0
    log(f"  vae: shift {shift:.4f} scale {scale:.4f} latent std {float(latents.std()):.3f} ({t_vae:.0f} s)")
    model, cond = pretrain_colour_transformer(
        latents, labels, steps=steps, seed=seed, progress=_logger("transformer", steps, log)
    )
    vae.save_pretrained(tmp / "vae")
    model.save_pretrained(tmp / "transformer")
    torch.save(cond.state_dict(), tmp / "conditioner.pt")
    return dict(vae_seconds=round(t_vae, 1), transformer_seconds=round(time.time() - t0 - t_vae, 1))


def colour_cache_path(*, vae_steps: int, steps: int, seed: int, cache_dir: str | Path | None = None) -> Path:
    """The cache directory of these settings (``colour-<key>`` under ``cache_dir`` or ``$NORMGUARD_CACHE``)."""
    root = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
    return root / f"colour-{_cache_key(vae_steps, steps, seed)}"


def load_or_pretrain_colour(
    *,
    vae_steps: int = 800,
    steps: int = 1200,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Path of the cached colour model (``vae/``, ``transformer/``, ``conditioner.pt``), trained first if needed."""
    target = colour_cache_path(vae_steps=vae_steps, steps=steps, seed=seed, cache_dir=cache_dir)

    def build(tmp: Path) -> dict:
        log(f"pretraining the colour task's VAE ({vae_steps} steps) and generator ({steps} steps) into {target} ...")
        times = _train_all(tmp, vae_steps=vae_steps, steps=steps, seed=seed, log=log)
        return dict(
            vae_steps=vae_steps, steps=steps, seed=seed, v=CACHE_VERSION, torch_threads=torch.get_num_threads(), **times
        )

    return build_once(target, build)


def load_colour_generator(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
) -> ColourGenerator:
    """Load a cached colour model directory as a generator (LoRA as the digits generator)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no colour model at {path} (expected meta.json, vae/, transformer/, conditioner.pt)")
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer")
    vae = AutoencoderKL.from_pretrained(path / "vae")
    cond = ColourConditioner()
    cond.load_state_dict(torch.load(path / "conditioner.pt", map_location="cpu", weights_only=True))
    return ColourGenerator(
        transformer,
        cond,
        vae,
        device=device,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
    )
