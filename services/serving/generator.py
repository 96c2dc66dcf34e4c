"""The model side of a replica: checkpoints loaded by id, a batch of requests sampled as one, a
failing batch redone request by request."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.checkpoints import load_weights
from services.models.sampling import fixed_noise, sample
from services.serving.config import ServeConfig

if TYPE_CHECKING:
    from services.models.base import FlowGenerator

__all__ = ["BASE_ID", "GenerationItem", "GeneratorCore", "clip"]

BASE_ID = "base"


@dataclass(frozen=True)
class GenerationItem:
    """One validated request, as the replica batches it.

    Attributes:
        prompts: one image each.
        num_steps, guidance_scale, renormalize: the sampler settings (requests sharing them and the
            checkpoint run as one batch, :attr:`batch_key`).
        shift: the serve config's grid shift, the same for every request of a replica (so not in the key).
        seed: the request's noise seed (its images do not depend on its batch neighbours).
        checkpoint: the checkpoint id.
        received: ``time.perf_counter()`` when the replica accepted it (its queue time).
    """

    prompts: tuple[str, ...]
    num_steps: int
    guidance_scale: float
    seed: int
    shift: float | None = None  # None: the family's grid
    checkpoint: str = BASE_ID
    renormalize: bool = False
    received: float = 0.0

    @property
    def batch_key(self) -> tuple:
        return (self.checkpoint, self.num_steps, self.guidance_scale, self.renormalize)


_FPS = 16  # a video's frame rate: Wan's (diffusers' Wan examples, export_to_video(..., fps=16))


def _png_b64(image: torch.Tensor) -> str:
    """One sample as a base64 PNG: an image ``(3, H, W)``, or a video ``(F, 3, H, W)`` as an animated PNG (APNG:
    lossless, every frame; browsers play it, other viewers show frame 0), looping at :data:`_FPS`."""
    from PIL import Image

    buf = io.BytesIO()
    frames = [image] if image.ndim == 3 else list(image)
    pil = [Image.fromarray((f.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()) for f in frames]
    if len(pil) == 1:
        pil[0].save(buf, "PNG")
    else:
        pil[0].save(buf, "PNG", save_all=True, append_images=pil[1:], duration=1000 / _FPS, loop=0)
    return base64.b64encode(buf.getvalue()).decode()


class GeneratorCore:
    """Plain class behind the ``NormGuard`` model replicas (``app.Replica``; tested in-process)."""

    def __init__(self, cfg: ServeConfig, model_path: str) -> None:
        from services.models import build_generator

        self.cfg, self.model_path = cfg, model_path
        self.build = lambda: build_generator(cfg.model, path=model_path, device="cuda" if cfg.replica_gpus else "cpu")

    def load(self, checkpoint_id: str):
        if checkpoint_id != BASE_ID and checkpoint_id not in self.cfg.checkpoints:
            raise KeyError(checkpoint_id)
        gen = self.build()
        if checkpoint_id != BASE_ID:
            gen.load_trainable_state_dict(load_weights(self.cfg.checkpoints[checkpoint_id]))
        return gen

    @staticmethod
    def run(gen: FlowGenerator, items: list[GenerationItem]) -> list[list[str]]:
        """One sampler batch for requests sharing (steps, guidance, renormalize); each request's noise
        comes from its own seed, so its images do not depend on its batch neighbours."""
        first = items[0]
        prompts = [p for it in items for p in it.prompts]
        noise = torch.cat([fixed_noise(gen, len(it.prompts), it.seed) for it in items])
        out = sample(
            gen,
            prompts,
            noise=noise,
            num_steps=first.num_steps,
            guidance_scale=first.guidance_scale,
            shift=first.shift,
            measure_ratio=False,
            renormalize=first.renormalize,
        )
        images = [_png_b64(im) for im in out.images]
        grouped, i = [], 0
        for it in items:
            grouped.append(images[i : i + len(it.prompts)])
            i += len(it.prompts)
        return grouped

    @staticmethod
    def run_isolated(gen: FlowGenerator, items: list[GenerationItem]) -> list[dict]:
        """:meth:`run` on the whole batch; if it fails, each request alone, so a bad one fails by itself
        (``{"error": ...}``) and its neighbours still get their images."""
        t0 = time.perf_counter()
        try:
            images = GeneratorCore.run(gen, items)
        except Exception:  # noqa: BLE001 - isolate: redo one by one
            return [GeneratorCore._alone(gen, it) for it in items]
        ms = (time.perf_counter() - t0) * 1000
        return [{"images": im, "batch_requests": len(items), "compute_ms": ms} for im in images]

    @staticmethod
    def _alone(gen: FlowGenerator, item: GenerationItem) -> dict:
        t0 = time.perf_counter()
        try:
            (images,) = GeneratorCore.run(gen, [item])
        except Exception as err:  # noqa: BLE001 - reported to this request only
            return {"error": f"{type(err).__name__}: {clip(str(err))}"}
        return {"images": images, "batch_requests": 1, "compute_ms": (time.perf_counter() - t0) * 1000}


def clip(text: str, limit: int = 200) -> str:
    """Error messages never echo large inputs back."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
