"""UnifiedReward (Wang et al., 2025, arXiv:2503.05236) as flow_grpo asks it: a 1-5 score read from the judge's text.

The request and the parse rule are flow_grpo's ``unifiedreward_score_sglang`` (yifan123/flow_grpo,
``flow_grpo/rewards.py``): each image is resized to 512 x 512 and sent as a PNG data URL
(``data:image;base64,...``) with the published question (:data:`QUESTION`, the prompt in its
``Text Caption: [...]``) to an OpenAI-compatible ``/chat/completions`` endpoint serving
``UnifiedReward-7b-v1.5`` (SGLang or vLLM), at temperature 0; the answer's first
``Final Score: x`` (x in 1-5, decimals allowed) gives the reward ``x / 5``, in [0.2, 1].

flow_grpo scores an answer with no ``Final Score:`` as 0 without a word; here it raises an error naming
the scorer and quoting the answer (``unparsable: zero`` restores flow_grpo's rule). The transport is the
HTTP judge's (:class:`services.rewards.judges.HTTPJudge`): bounded concurrent requests, bearer auth,
timeouts, retries of failed requests with backoff (an answer that does not parse is not retried: at
temperature 0 it would come back the same).

``path``: the base URL (``http://host:port/v1``); ``options``: ``model`` (default
``UnifiedReward-7b-v1.5``), ``api_key``, ``concurrency``, ``timeout_s``, ``retries``, ``backoff_s``,
``max_tokens`` (default: none sent, as flow_grpo), ``resize`` (default 512; ``null`` keeps the size),
``unparsable`` (``error`` or ``zero``).
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import torch
from torch import Tensor

from services.rewards.judges import HTTPJudge

__all__ = ["QUESTION", "UnifiedRewardJudge", "UnparsableAnswer", "parse_final_score"]

QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to evaluate "
    "this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with "
    "the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as "
    "described in the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including "
    "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, "
    "assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
_FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")  # flow_grpo's _extract_scores pattern
MAX_SCORE = 5.0


class UnparsableAnswer(RuntimeError):
    """The judge answered, but without a ``Final Score: x`` (not retried; see the module docstring)."""


def parse_final_score(text: str | None, *, scorer: str = "unified_reward") -> float:
    """``x / 5`` for the first ``Final Score: x`` in ``text``; :class:`UnparsableAnswer` naming ``scorer`` if none."""
    text = text if isinstance(text, str) else ""  # a null / non-text content parses as no answer
    match = _FINAL_SCORE.search(text)
    if match is None:
        raise UnparsableAnswer(f"{scorer}: no 'Final Score: <1-5>' in the judge's answer {text[:200]!r}")
    return float(match.group(1)) / MAX_SCORE


class UnifiedRewardJudge(HTTPJudge):
    """flow_grpo's UnifiedReward request over the HTTP judge's client (the payload and the reading differ)."""

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        model: str = "UnifiedReward-7b-v1.5",
        question: str = QUESTION,
        resize: int | None = 512,
        max_tokens: int | None = None,
        unparsable: str = "error",
        **http_options: Any,
    ) -> None:
        if unparsable not in ("error", "zero"):
            raise ValueError(f"{name}: unparsable must be 'error' or 'zero', got {unparsable!r}")
        super().__init__(name, path, model=model, question=question, **http_options)
        self.resize, self.max_tokens, self.unparsable = resize, max_tokens, unparsable

    def _payload(self, image: Tensor, prompt: str) -> dict:
        from PIL import Image

        pil = Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
        if self.resize:
            pil = pil.resize((self.resize, self.resize), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        pil.save(buf, "PNG")
        url = "data:image;base64," + base64.b64encode(buf.getvalue()).decode()  # flow_grpo's pil_image_to_base64
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": self.question.format(prompt=prompt)},
        ]
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        return payload

    def _read(self, body: dict) -> float:
        text = body["choices"][0]["message"]["content"]
        try:
            return parse_final_score(text, scorer=self.name)
        except UnparsableAnswer:
            if self.unparsable == "zero":  # flow_grpo's rule
                return 0.0
            raise


def _unified_reward(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> UnifiedRewardJudge:
    return UnifiedRewardJudge("unified_reward", path, device=device, **options)
