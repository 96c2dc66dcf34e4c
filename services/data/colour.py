"""The colour task's data: procedural RGB scenes of a shaded, textured object on a background.

Every image composes three attributes, drawn uniformly and independently:

* **shape** (4): circle, square, triangle, ring - soft-edged (about one pixel of anti-aliasing), with
  position (+-0.25 of the half-width), size (0.42-0.62) and, for the square and triangle, rotation
  (+-20 degrees) jittered per image;
* **colour** (6): red, orange, yellow, green, blue, purple at moderate HSV saturation (0.50-0.66)
  and value (0.62-0.78), hue jittered +-6 degrees: no pure primaries, so brighter, more saturated
  and flatter images all remain possible;
* **background** (4): light / dark (grey level about 0.70 / 0.30, faint tint) x plain (a low-frequency
  mottle) / striped (soft stripes at mid contrast, random period 7-11 px, angle and phase).

The object carries a lighting gradient (a random light direction, +-22 % brightness across it) and
every pixel a fine grain (2-px noise, 0.035 in [0, 1] units) and a 1-px noise (0.015). Pixel statistics
stay mid-range (mean luma about 0.5, mean HSV saturation about 0.2).

Images are ``(N, 3, 32, 32)`` in [-1, 1]; labels ``(N, 3)`` are (shape, colour, background) indices.
``colour_dataset(n, seed)`` is a pure function of its arguments; the training split uses
:data:`TRAIN_SEED`, the held-out split (judges' real references) :data:`TEST_SEED`.
Prompts read ``"a red circle on a dark striped background"``; ``""`` is the null prompt (CFG).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKGROUNDS",
    "NULL_LABEL",
    "COLOURS",
    "RESOLUTION",
    "all_prompts",
    "SHAPES",
    "colour_dataset",
    "colour_prompt",
    "parse_colour_prompt",
    "real_colour_images",
]

SHAPES = ("circle", "square", "triangle", "ring")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("light plain", "dark plain", "light striped", "dark striped")
NULL_LABEL = (len(SHAPES), len(COLOURS), len(BACKGROUNDS))  # per-attribute null index (CFG)
RESOLUTION = 32
TRAIN_SEED, TEST_SEED = 0, 1_000_003
_HUES = torch.tensor([0.0, 28.0, 52.0, 125.0, 220.0, 280.0]) / 360.0
_PROMPT = re.compile(
    rf"^\s*an?\s+({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\s+on\s+an?\s+"
    rf"({'|'.join(BACKGROUNDS)})\s+background\s*$",
    re.IGNORECASE,
)


def colour_prompt(shape: int, colour: int, background: int) -> str:
    """The canonical prompt of an attribute triple."""
    return f"a {COLOURS[colour]} {SHAPES[shape]} on a {BACKGROUNDS[background]} background"


def parse_colour_prompt(prompt: str) -> tuple[int, int, int]:
    """``"a red circle on a dark striped background"`` -> (0, 0, 3); ``""`` -> :data:`NULL_LABEL`."""
    if prompt.strip() == "":
        return NULL_LABEL
    m = _PROMPT.match(prompt)
    if not m:
        raise ValueError(
            f"colour prompts look like 'a red circle on a dark striped background' (colours {COLOURS}, "
            f"shapes {SHAPES}, backgrounds {BACKGROUNDS}) or '' (null); got {prompt!r}"
        )
    colour, shape, background = (s.lower() for s in m.groups())
    return SHAPES.index(shape), COLOURS.index(colour), BACKGROUNDS.index(background)


def all_prompts() -> list[str]:
    """The 96 prompts of the task, shape-major."""
    return [
        colour_prompt(s, c, b) for s in range(len(SHAPES)) for c in range(len(COLOURS)) for b in range(len(BACKGROUNDS))
    ]


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``(...)`` hue in [0, 1), saturation, value -> ``(..., 3)`` RGB in [0, 1]."""
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], dim=-1)
    f = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v[..., None] - v[..., None] * s[..., None] * f


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _shape_distance(shape: Tensor, x: Tensor, y: Tensor, r: Tensor) -> Tensor:
    """Signed distance (negative inside) of each image's shape; ``x, y (N, R, R)`` object-frame coords."""
    radius = torch.sqrt(x**2 + y**2)
    circle = radius - r
    square = torch.maximum(x.abs(), y.abs()) - 0.85 * r
    angles = [math.pi / 2 + 2 * math.pi * k / 3 for k in range(3)]  # edge normals of an equilateral triangle
    tri = torch.stack([-(x * math.cos(a) + y * math.sin(a)) for a in angles]).amax(0) - 0.55 * r
    ring = (radius - 0.72 * r).abs() - 0.28 * r
    table = torch.stack([circle, square, tri, ring], dim=1)  # (N, 4, R, R)
    return table.gather(1, shape[:, None, None, None].expand(-1, 1, *x.shape[1:])).squeeze(1)


def _noise_field(gen: torch.Generator, n: int, cells: int, res: int) -> Tensor:
    """``(N, R, R)`` unit-std noise on a ``cells x cells`` lattice, upsampled bilinearly."""
    z = torch.randn(n, 1, cells, cells, generator=gen)
    return F.interpolate(z, size=(res, res), mode="bilinear", align_corners=False).squeeze(1)


def _background(gen: torch.Generator, bg: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``(N, 3, R, R)`` backgrounds in [0, 1]; ``u, v (R, R)`` pixel coordinates in [-1, 1]."""
    n, res = bg.shape[0], u.shape[-1]
    light = (bg % 2 == 0).float()
    level = torch.where(light > 0, _uniform(gen, n, 0.64, 0.76), _uniform(gen, n, 0.24, 0.36))
    tint = hsv_to_rgb(torch.rand(n, generator=gen), _uniform(gen, n, 0.0, 0.10), torch.ones(n))  # (N, 3)
    base = level[:, None] * tint / tint.mean(dim=1, keepdim=True)
    mottle = 0.05 * _noise_field(gen, n, 4, res)  # (N, R, R)
    angle = torch.rand(n, generator=gen) * math.pi
    period = _uniform(gen, n, 7.0, 11.0) * 2.0 / res  # in [-1, 1] units
    phase = torch.rand(n, generator=gen) * 2 * math.pi
    coord = u[None] * angle.cos()[:, None, None] + v[None] * angle.sin()[:, None, None]
    stripes = 0.11 * torch.tanh(2.5 * torch.sin(2 * math.pi * coord / period[:, None, None] + phase[:, None, None]))
    pattern = torch.where((bg >= 2)[:, None, None], stripes, mottle)
    return base[:, :, None, None] + pattern[:, None]


def _object(gen: torch.Generator, labels: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, 3, R, R)`` shaded object colour and ``(N, 1, R, R)`` soft mask."""
    n = labels.shape[0]
    cx, cy = _uniform(gen, n, -0.25, 0.25), _uniform(gen, n, -0.25, 0.25)
    r = _uniform(gen, n, 0.42, 0.62)
    rot = _uniform(gen, n, -20.0, 20.0) * math.pi / 180
    dx, dy = u[None] - cx[:, None, None], v[None] - cy[:, None, None]  # (N, R, R)
    c, s = rot.cos()[:, None, None], rot.sin()[:, None, None]
    x, y = c * dx + s * dy, -s * dx + c * dy
    mask = torch.sigmoid(-_shape_distance(labels[:, 0], x, y, r[:, None, None]) / 0.035)
    hue = (_HUES[labels[:, 1]] + _uniform(gen, n, -6.0, 6.0) / 360.0) % 1.0
    rgb = hsv_to_rgb(hue, _uniform(gen, n, 0.50, 0.66), _uniform(gen, n, 0.62, 0.78))  # (N, 3)
    light = _uniform(gen, n, 0.0, 2 * math.pi)
    along = (dx * light.cos()[:, None, None] + dy * light.sin()[:, None, None]) / r[:, None, None]
    shade = 1.0 + 0.22 * along.clamp(-1.0, 1.0)  # (N, R, R) lighting gradient across the object
    return rgb[:, :, None, None] * shade[:, None], mask[:, None]


def colour_dataset(n: int, seed: int = TRAIN_SEED, resolution: int = RESOLUTION) -> tuple[Tensor, Tensor]:
    """``n`` scenes from ``seed``: ``(N, 3, R, R)`` images in [-1, 1] and ``(N, 3)`` labels (deterministic)."""
    if n < 1:
        raise ValueError(f"colour_dataset: n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.stack(
        [torch.randint(0, k, (n,), generator=gen) for k in (len(SHAPES), len(COLOURS), len(BACKGROUNDS))], dim=1
    )
    ax = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    v, u = torch.meshgrid(ax, ax, indexing="ij")  # v: rows (down), u: columns (right)
    bg = _background(gen, labels[:, 2], u, v)
    obj, mask = _object(gen, labels, u, v)
    img = mask * obj + (1 - mask) * bg  # (N, 3, R, R)
    grain = 0.035 * _noise_field(gen, n, resolution // 2, resolution)[:, None]  # luminance grain
    fine = 0.015 * torch.randn(img.shape, generator=gen)
    img = (img + grain + fine).clamp(0.0, 1.0)
    return img * 2.0 - 1.0, labels


def real_colour_images(n: int = 1024, *, split: str = "test") -> Tensor:
    """Real scenes as ``(N, 3, 32, 32)`` images in [0, 1] (``split``: "test" is the held-out one)."""
    seeds = {"train": TRAIN_SEED, "test": TEST_SEED}
    if split not in seeds:
        raise ValueError(f"split must be one of {sorted(seeds)}, got {split!r}")
    return (colour_dataset(n, seeds[split])[0] + 1.0) / 2.0
