"""The OCR reward: 1 - normalised edit distance between the prompt's quoted text and what an OCR model reads.

The rule is flow_grpo's ``OcrScorer`` (``flow_grpo/ocr.py``, read at yifan123/flow_grpo's copy in
Xianchao-Wu/flow_grpo): both strings are lower-cased with every space removed; if the target is a
substring of the reading the distance is 0, otherwise it is the Levenshtein distance, clipped to
``len(target)``; the reward is ``1 - distance / len(target)``, in [0, 1]. Two things flow_grpo leaves
undefined are fixed here: it takes ``prompt.split('"')[1]`` (an IndexError when the prompt has no
double quote) and divides by ``len(target)`` (a ZeroDivisionError for ``""``). Here the target is every
double-quoted span, joined in order (the first one alone in flow_grpo; its prompts have one), or, when
there is none, every single-quoted span whose quotes are not inside a word (so "don't" is no quote);
the denominator is ``max(len(target), 1)``. A prompt with no quoted text asks for no text, so its
target is ``""``, which every reading contains: reward 1.

The reader (what an OCR model reads, one string per image):

* ``path``: a transformers ``VisionEncoderDecoderModel`` OCR checkpoint, TrOCR's layout (a ViT / DeiT
  encoder and a ``TrOCRForCausalLM`` decoder, e.g. ``microsoft/trocr-base-printed``; a local directory
  or hub id, with its tokenizer). Pixels are resized to the encoder's ``image_size`` and normalised with
  the checkpoint's ``preprocessor_config.json`` mean / std (TrOCR's are 0.5) in torch, without an image
  processor; text is read by greedy decoding (``max_new_tokens``). TrOCR reads one text line; for whole
  scenes use a detector + recogniser through ``reader``.
* ``options: {reader: "package.module:read"}``: any callable ``read(list of (H, W, 3) uint8 arrays) ->
  list[str]`` (or a callable object, when built in Python), called instead of a model. PaddleOCR, the
  reader flow_grpo and Flow-Factory use, is heavy and brings its own dependencies (paddlepaddle, and
  opencv), so it is reached through the reward server (``services/rewards/server.py``): a server entry
  ``{scorer: ocr, options: {reader: "my_pkg.paddle:read"}, runtime_env: {pip: [paddleocr]}}`` runs this
  scorer with PaddleOCR on its own replicas, and training names it with ``server:``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.rewards.base import validate_images

__all__ = ["OCRScorer", "edit_distance", "ocr_reward", "quoted_text"]

_DOUBLE = re.compile(r'"([^"]*)"')
_SINGLE = re.compile(r"(?<!\w)'([^']*)'(?!\w)")  # an apostrophe inside a word is no quote


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to be written: its double-quoted spans joined, else its single-quoted ones."""
    spans = _DOUBLE.findall(prompt) or _SINGLE.findall(prompt)
    return "".join(spans)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions and substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _normalise(text: str) -> str:
    return text.replace(" ", "").lower()  # flow_grpo's: spaces removed (only " "), lower-cased


def ocr_reward(target: str, read: str) -> float:
    """flow_grpo's OCR reward of one reading (see the module docstring), in [0, 1]."""
    gt, text = _normalise(target), _normalise(read)
    dist = 0 if gt in text else min(edit_distance(text, gt), len(gt))
    return 1.0 - dist / max(len(gt), 1)


def _import_reader(reader: str | Callable) -> Callable[[list], list[str]]:
    if callable(reader):
        return reader
    import importlib

    module, sep, attr = str(reader).partition(":")
    if not sep:
        raise ValueError(f"ocr: reader must look like 'package.module:function', got {reader!r}")
    return getattr(importlib.import_module(module), attr)


class OCRScorer:
    """``ocr_reward(quoted_text(prompt), reader(image))`` per image."""

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        reader: str | Callable | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        max_new_tokens: int = 32,
    ) -> None:
        if (path is None) == (reader is None):
            raise ValueError(f"{name}: give exactly one of path= (a TrOCR checkpoint) or options: {{reader: ...}}")
        self.name, self.batch_size, self.device = name, batch_size, torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.reader = _import_reader(reader) if reader is not None else None
        if path is not None:
            self._load_model(path)

    def _load_model(self, path: str) -> None:
        from transformers import AutoTokenizer, VisionEncoderDecoderModel

        from services.hub import load_pretrained_checked

        self.model = load_pretrained_checked(VisionEncoderDecoderModel, path, what=f"{self.name} OCR model")
        self.model.to(self.device).eval()
        self.tokenizer = load_pretrained_checked(AutoTokenizer, path, what=f"{self.name} tokenizer")
        size = self.model.config.encoder.image_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        mean, std = _mean_std(path)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def read(self, images: Tensor) -> list[str]:
        """What the reader reads in each ``(B, 3, H, W)`` image in [0, 1]."""
        if self.reader is not None:
            arrays = list((images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
            texts = list(self.reader(arrays))
            if len(texts) != len(arrays) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{self.name}: the reader must return one string per image, got {texts!r:.200}")
            return texts
        x = images.detach().float().clamp(0, 1).to(self.device)
        x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std  # (B, 3, h, w), the checkpoint's normalisation
        ids = self.model.generate(pixel_values=x, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        texts: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            texts += self.read(images[i : i + self.batch_size])
        return torch.tensor([ocr_reward(quoted_text(p), t) for p, t in zip(prompts, texts)], dtype=torch.float32)


def _mean_std(path: str) -> tuple[list[float], list[float]]:
    """The checkpoint's image mean / std (``preprocessor_config.json``), TrOCR's 0.5 / 0.5 without one."""
    cfg = Path(path).expanduser() / "preprocessor_config.json"
    if not cfg.is_file():
        try:
            from huggingface_hub import hf_hub_download

            cfg = Path(hf_hub_download(path, "preprocessor_config.json"))
        except Exception:  # a local directory without one, or no hub: TrOCR's published values
            return [0.5] * 3, [0.5] * 3
    raw = json.loads(cfg.read_text())
    return list(raw.get("image_mean", [0.5] * 3)), list(raw.get("image_std", [0.5] * 3))


def _ocr(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> OCRScorer:
    return OCRScorer("ocr", path, device=device, **options)
