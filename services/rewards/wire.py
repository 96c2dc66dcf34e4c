"""The reward server's wire format: JSON with base64 PNG images, never pickle.

A request body (``POST <server>/score``)::

    {"images": ["<base64 PNG>", ...], "prompts": ["...", ...], "metadata": [{...} | null, ...],
     "group_ids": [0, 0, 1, ...]}

``prompts``, ``metadata`` and ``group_ids`` are optional (one entry per image when given). The field names
are flow_grpo's (``flow_grpo/rewards.py``: its DeQA / GenEval / UnifiedReward clients send ``images``,
``prompts`` and ``meta_datas``, the last accepted here as an alias of ``metadata``); its format is not:
those clients ``pickle.dumps`` the request and ``pickle.loads`` the reply, so whoever answers on the
port runs code in the trainer. Here both directions are JSON, and an image is any PIL-readable file
(PNG from this package's client; JPEG, as flow_grpo sends, decodes as well), optionally as a
``data:image/...;base64,`` URL.

A reply::

    {"scorer": "<name>", "scores": [0.31, ...]}

(``outputs``, flow_grpo's name for the scores, is read by the client as well).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

__all__ = [
    "ScoreBody",
    "WireError",
    "decode_image",
    "encode_png",
    "parse_body",
    "parse_scores",
    "request_body",
    "to_uint8",
]


class WireError(ValueError):
    """A request or reply that does not follow the wire format (the message says what is wrong)."""


class ScoreBody(BaseModel):
    """A request body, checked before anything is decoded (unknown fields refused)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    images: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    metadata: list[dict[str, Any] | None] | None = Field(default=None, alias="meta_datas")
    group_ids: list[int] | None = None

    @model_validator(mode="after")
    def _one_per_image(self) -> ScoreBody:
        n = len(self.images)
        for field in ("prompts", "metadata", "group_ids"):
            value = getattr(self, field)
            if value is not None and len(value) != n:
                raise ValueError(f"{field} has {len(value)} entries for {n} images")
        return self


def to_uint8(images: Tensor) -> Tensor:
    """``(B, 3, H, W)`` floats in [0, 1] -> uint8, the quantisation every PNG of them has."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def encode_png(image: Tensor) -> str:
    """One ``(3, H, W)`` uint8 image as base64 PNG (lossless: the server sees the quantised pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str, *, max_pixels: int) -> Tensor:
    """A base64 image (or ``data:`` URL) -> ``(3, H, W)`` uint8; the size is checked from the header,
    before the pixels are decoded (a decompression bomb is refused, not unpacked)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise WireError(f"an image is not valid base64: {err}") from err
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise WireError(f"an image of {w}x{h} is larger than the server's {max_pixels} pixels")
            arr = torch.from_numpy(np.asarray(im.convert("RGB")).copy())
    except (UnidentifiedImageError, OSError) as err:
        raise WireError(f"an image cannot be read as PNG / JPEG: {err}") from err
    return arr.permute(2, 0, 1).contiguous()


def request_body(
    images_u8: Tensor,
    prompts: Sequence[str],
    *,
    group_ids: Tensor | None = None,
    metadata: Sequence[dict | None] | None = None,
) -> dict:
    """The JSON body of one request (:class:`ScoreBody`'s fields)."""
    body: dict[str, Any] = {"images": [encode_png(img) for img in images_u8], "prompts": list(prompts)}
    if group_ids is not None:
        body["group_ids"] = [int(g) for g in group_ids]
    if metadata is not None:
        body["metadata"] = list(metadata)
    return body


def parse_body(raw: bytes) -> ScoreBody:
    """A request body's bytes -> :class:`ScoreBody` (a :class:`WireError` says what is wrong)."""
    import json

    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise WireError(f"the body is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise WireError(f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return ScoreBody.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise WireError(f"the body does not follow the wire format: {problems}") from err


def parse_scores(data: Any, n: int) -> list[float]:
    """A reply's scores: ``n`` finite numbers under ``scores`` (or flow_grpo's ``outputs``)."""
    if not isinstance(data, dict):
        raise WireError(f"the reply is a JSON {type(data).__name__}, not an object with 'scores'")
    scores = data.get("scores", data.get("outputs"))
    if not isinstance(scores, list):
        raise WireError(f"the reply has no 'scores' list (keys: {sorted(data)[:6]})")
    if len(scores) != n:
        raise WireError(f"the reply has {len(scores)} scores for {n} images")
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise WireError(f"the reply's scores must be finite numbers, got {s!r}")
    return [float(s) for s in scores]
