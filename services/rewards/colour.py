"""Scorers of the colour task (``services.models.colour``): two reward proxies, judges, image statistics.

Reward proxies (neither is a hand-written function of brightness or saturation):

* ``colour_clip`` - PickScore-style prompt-image alignment from the task's own CLIP
  (``services.rewards.colour_training.ColourCLIP``, trained contrastively on real images only):
  ``logit_scale * cos(image, text) / 100``. PickScore's reward is ``logit_scale * cos`` (logit_scale
  about 100 after CLIP's clamp); dividing by CLIP's maximum 100 puts ours in [-1, 1] whatever
  temperature training reached (real images score about ``0.7 * logit_scale / 100``).
* ``colour_jpeg`` - DDPO's JPEG incompressibility (kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py``,
  ``jpeg_incompressibility``, commit 1958463): the images are rounded to uint8, encoded by PIL as JPEG
  at quality 95 and the reward is the file size in kB. By default it is normalised,
  ``(kB - kB_flat) / (kB_noise - kB_flat)``, with the sizes of a flat mid-grey image (0) and of uniform
  RGB noise (1) at the same resolution, so a 32 x 32 image scores in about [0, 1] (real data about 0.3);
  ``raw=True`` gives DDPO's kB.

Judges (never trained on RL samples): ``colour_judge`` (mean over the shape / colour / background heads of
P(prompted attribute); ``features`` for FD / KID / precision / recall / diversity), ``colour_realism``
(P(real) of a real-vs-base-model detector), and the statistics of :func:`colour_stats` as per-image
scorers ``colour_brightness`` / ``colour_saturation`` / ``colour_contrast`` / ``colour_texture``
(``relative=True``: minus the held-out real data's mean, i.e. the gap).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from services.data.colour import RESOLUTION, parse_colour_prompt
from services.rewards.base import validate_images
from services.rewards.colour_training import ColourCLIP, ColourNet, RealismCNN

__all__ = ["ColourNetScorer", "ColourStatScorer", "JpegScorer", "colour_stats", "jpeg_kilobytes"]

STATS = ("brightness", "saturation", "contrast", "texture")


def colour_stats(images: Tensor) -> dict[str, Tensor]:
    """Per-image statistics of ``(B, 3, H, W)`` images in [0, 1], each ``(B,)``.

    brightness: mean Rec. 601 luma; saturation: mean HSV saturation ``(max - min) / max`` (0 where
    max = 0); contrast: RMS contrast, the standard deviation of the luma; texture: high-frequency energy,
    the RMS of the luma minus its 3 x 3 box blur (replicate padding).
    """
    x = images.float().clamp(0.0, 1.0)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (B, H, W)
    hi, lo = x.amax(dim=1), x.amin(dim=1)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-8), torch.zeros_like(hi))
    blur = F.avg_pool2d(F.pad(luma[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    return {
        "brightness": luma.mean(dim=(1, 2)),
        "saturation": sat.mean(dim=(1, 2)),
        "contrast": luma.flatten(1).std(dim=1),
        "texture": (luma - blur).pow(2).mean(dim=(1, 2)).sqrt(),
    }


def _to_net(images: Tensor, device: torch.device) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, 32, 32)`` in [-1, 1] on ``device``."""
    x = images.to(device).float()
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0


class ColourNetScorer:
    """``kind``: "clip" (the proxy), "judge" (mean P(prompted attribute)) or "realism" (P(real))."""

    def __init__(self, name: str, net: ColourNet, *, kind: str, device: str | torch.device = "cpu") -> None:
        if kind not in ("clip", "judge", "realism"):
            raise ValueError(f"{name}: kind must be clip, judge or realism, got {kind!r}")
        self.name, self.kind = name, kind
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        with torch.no_grad():
            return self.differentiable_score(images, prompts).cpu()

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``(B, F)`` (the judge's 128-d; the set-level metrics use them)."""
        x = _to_net(images, self.device)
        return self.net.encode_image(x) if isinstance(self.net, ColourCLIP) else self.net.features(x)

    def differentiable_score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The ``(B,)`` score with gradients w.r.t. the images."""
        x = _to_net(images, self.device)
        if isinstance(self.net, RealismCNN):
            return self.net(x).softmax(dim=-1)[:, 1].float()
        if isinstance(self.net, ColourCLIP):
            from services.rewards.colour_training import LOGIT_SCALE_MAX, tokenize

            txt = self.net.encode_text(tokenize(prompts).to(self.device))  # (B, D)
            cos = (self.net.encode_image(x) * txt).sum(dim=-1)
            return (self.net.scale() * cos / LOGIT_SCALE_MAX).float()
        labels = torch.tensor([parse_colour_prompt(p) for p in prompts], device=self.device)  # (B, 3)
        heads = self.net(x)
        if any(bool((labels[:, k] >= h.shape[1]).any()) for k, h in enumerate(heads)):
            raise ValueError(f"{self.name}: every prompt must name a shape, colour and background to be scored")
        probs = [h.softmax(-1).gather(1, labels[:, k : k + 1]).squeeze(1) for k, h in enumerate(heads)]
        return torch.stack(probs).mean(dim=0).float()


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> Tensor:
    """``(B,)`` JPEG sizes in kB of ``(B, 3, H, W)`` images in [0, 1] (DDPO's encoding, module docstring)."""
    from PIL import Image

    arr = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegScorer:
    """DDPO's JPEG incompressibility, normalised by a flat and a noise image unless ``raw``."""

    def __init__(self, name: str = "colour_jpeg", *, raw: bool = False, quality: int = 95) -> None:
        self.name, self.raw, self.quality = name, raw, quality
        self._anchors: dict[tuple[int, int], tuple[float, float]] = {}

    def anchors(self, height: int, width: int) -> tuple[float, float]:
        """kB of a flat mid-grey image and of uniform noise (seed 0) at ``height x width``."""
        if (height, width) not in self._anchors:
            flat = torch.full((1, 3, height, width), 0.5)
            noise = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
            kb = jpeg_kilobytes(torch.cat([flat, noise]), self.quality)
            self._anchors[(height, width)] = (float(kb[0]), float(kb[1]))
        return self._anchors[(height, width)]

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        kb = jpeg_kilobytes(images, self.quality)
        if self.raw:
            return kb
        lo, hi = self.anchors(images.shape[-2], images.shape[-1])
        return (kb - lo) / (hi - lo)


class ColourStatScorer:
    """One :func:`colour_stats` statistic per image (``relative``: minus the real held-out data's mean)."""

    def __init__(self, stat: str, *, relative: bool = False) -> None:
        if stat not in STATS:
            raise ValueError(f"colour statistic must be one of {STATS}, got {stat!r}")
        self.name, self.stat, self.relative = f"colour_{stat}", stat, relative
        self._real: float | None = None

    @property
    def real_mean(self) -> float:
        """The statistic's mean over 1024 held-out real images."""
        if self._real is None:
            from services.data.colour import real_colour_images

            self._real = float(colour_stats(real_colour_images(1024, split="test"))[self.stat].mean())
        return self._real

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        value = colour_stats(images)[self.stat].cpu()
        return value - self.real_mean if self.relative else value


def _net(path: str | None, which: str, name: str, device: str | torch.device) -> ColourNetScorer:
    from services.rewards.colour_training import load_net

    return ColourNetScorer(name, load_net(path, which), kind=which, device=device)


def _clip(path: str | None = None, device: str | torch.device = "cpu") -> ColourNetScorer:
    return _net(path, "clip", "colour_clip", device)


def _judge(path: str | None = None, device: str | torch.device = "cpu") -> ColourNetScorer:
    return _net(path, "judge", "colour_judge", device)


def _realism(path: str | None = None, device: str | torch.device = "cpu") -> ColourNetScorer:
    return _net(path, "realism", "colour_realism", device)


def _jpeg(path: str | None = None, device: str | torch.device = "cpu", raw: bool = False) -> JpegScorer:
    return JpegScorer(raw=raw)


def _brightness(path: str | None = None, device: str | torch.device = "cpu", relative: bool = False):
    return ColourStatScorer("brightness", relative=relative)


def _saturation(path: str | None = None, device: str | torch.device = "cpu", relative: bool = False):
    return ColourStatScorer("saturation", relative=relative)


def _contrast(path: str | None = None, device: str | torch.device = "cpu", relative: bool = False):
    return ColourStatScorer("contrast", relative=relative)


def _texture(path: str | None = None, device: str | torch.device = "cpu", relative: bool = False):
    return ColourStatScorer("texture", relative=relative)
