"""MLLM judges: a local vision-language model read from next-token probabilities, and an
OpenAI-compatible HTTP client for judges served elsewhere.

The judge is asked a quality question (template in config). ``mode="yes_no"`` scores
``P(yes) / (P(yes) + P(no))`` from the next-token distribution; ``mode="rating"`` scores the
expected value of the rating tokens ``"1".."N"`` renormalised over those tokens, mapped to
[0, 1]. Reading probabilities instead of sampled text follows the VLM-as-judge reward of
Flow-GRPO / UnifiedReward-style judges and gives a dense, deterministic score.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from services.hub import load_pretrained_checked
from services.rewards.base import validate_images

if TYPE_CHECKING:
    import httpx

__all__ = ["HTTPJudge", "LocalVLMJudge", "probs_to_score"]

log = logging.getLogger(__name__)
DEFAULT_QUESTION = (
    "Is this image of high quality, free of artifacts and faithful to the prompt '{prompt}'? Answer Yes or No."
)


def probs_to_score(token_probs: Tensor, *, mode: str) -> Tensor:
    """Map next-token probabilities to a score in [0, 1].

    Args:
        token_probs: ``(B, K)`` probabilities of the answer tokens: ``[yes, no]`` for
            ``yes_no``, ``["1", ..., "K"]`` for ``rating``.
        mode: ``"yes_no"`` or ``"rating"``.

    Returns:
        ``(B,)``.
    """
    p = token_probs.float() / token_probs.float().sum(dim=-1, keepdim=True).clamp_min(1e-12)
    if mode == "yes_no":
        return p[:, 0]
    if mode == "rating":
        k = p.shape[-1]
        values = torch.arange(1, k + 1, dtype=p.dtype, device=p.device)
        return ((p * values).sum(dim=-1) - 1.0) / max(k - 1, 1)
    raise ValueError(f"unknown judge mode {mode!r}; known: 'yes_no', 'rating'")


def _answer_tokens(mode: str, num_ratings: int) -> list[str]:
    return ["Yes", "No"] if mode == "yes_no" else [str(i) for i in range(1, num_ratings + 1)]


class LocalVLMJudge:
    """A transformers image-text-to-text model (LLaVA, Qwen2.5-VL families) as a judge."""

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        device: str | torch.device = "cpu",
        mode: str = "yes_no",
        question: str = DEFAULT_QUESTION,
        num_ratings: int = 10,
        batch_size: int = 8,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name, self.mode, self.question, self.batch_size = name, mode, question, batch_size
        self.device = torch.device(device)
        self.processor = load_pretrained_checked(AutoProcessor, path, what=name)
        self.processor.tokenizer.padding_side = "left"  # the next token is the last position
        self.model = load_pretrained_checked(AutoModelForImageTextToText, path, what=name).to(self.device).eval()
        tok = self.processor.tokenizer
        self.answer_ids = []
        for t in _answer_tokens(mode, num_ratings):
            ids = tok.encode(t, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"{name}: answer token {t!r} is not a single token in this tokenizer ({ids})")
            self.answer_ids.append(ids[0])

    def _messages(self, prompt: str) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.question.format(prompt=prompt)}],
            }
        ]

    def answer_probs(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``(B, K)`` softmax probabilities of the answer tokens at the next position."""
        from PIL import Image

        pil = [Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()) for img in images]
        texts = [self.processor.apply_chat_template(self._messages(p), add_generation_prompt=True) for p in prompts]
        inputs = self.processor(images=pil, text=texts, return_tensors="pt", padding=True).to(self.device)
        logits = self.model(**inputs).logits[:, -1, :].float()  # (B, V)
        return logits.softmax(dim=-1)[:, self.answer_ids]

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        out = [
            probs_to_score(
                self.answer_probs(images[i : i + self.batch_size], prompts[i : i + self.batch_size]), mode=self.mode
            )
            for i in range(0, len(prompts), self.batch_size)
        ]
        return torch.cat(out).cpu()


class HTTPJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, ...).

    Each image is sent as a PNG data URL with ``max_tokens=1, logprobs=true``; the score is
    read from ``top_logprobs`` of the first token. Up to ``concurrency`` requests are in flight
    at once (one per image: the OpenAI chat API takes one conversation per request, and a
    vLLM / SGLang server batches concurrent ones itself), so a step's images wait on about
    ``B / concurrency`` round trips instead of ``B``; ``concurrency: 1`` sends them in turn.
    Timeouts per request, retries with exponential backoff; a request that still fails raises
    (the reward actor counts and reports it; a required scorer then fails the step).
    """

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        model: str = "judge",
        mode: str = "yes_no",
        question: str = DEFAULT_QUESTION,
        num_ratings: int = 10,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        api_key: str | None = None,
        concurrency: int = 8,
        transport: httpx.BaseTransport | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        import httpx

        if not path:
            raise ValueError(f"{name}: needs path= the base URL, e.g. http://127.0.0.1:8000/v1")
        if concurrency < 1:
            raise ValueError(f"{name}: concurrency must be >= 1, got {concurrency}")
        self.name, self.model, self.mode, self.question = name, model, mode, question
        self.retries, self.backoff_s, self.concurrency = retries, backoff_s, concurrency
        self.answers = _answer_tokens(mode, num_ratings)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(
            base_url=path.rstrip("/"), timeout=timeout_s, headers=headers, limits=limits, transport=transport
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name) if concurrency > 1 else None
        self._lock = threading.Lock()
        self.failures = 0

    def _payload(self, image: Tensor, prompt: str) -> dict:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": self.question.format(prompt=prompt)},
        ]
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": 20,
            "temperature": 0.0,
        }

    def _read(self, body: dict) -> float:
        """The score in a ``/chat/completions`` reply: the answer tokens' probabilities in ``top_logprobs``."""
        top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        probs = {a: 0.0 for a in self.answers}
        for entry in top:
            tok = entry["token"].strip()
            for a in self.answers:
                if tok.lower() == a.lower():
                    probs[a] += math.exp(entry["logprob"])
        return float(probs_to_score(torch.tensor([[probs[a] for a in self.answers]]), mode=self.mode)[0])

    def _one(self, image: Tensor, prompt: str) -> float:
        import httpx

        payload = self._payload(image, prompt)
        for attempt in range(self.retries + 1):
            try:
                resp = self.client.post("/chat/completions", json=payload)
                resp.raise_for_status()
                return self._read(resp.json())
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
                with self._lock:  # counted from the request threads
                    self.failures += 1
                if attempt == self.retries:
                    raise RuntimeError(f"{self.name}: judge request failed after {attempt + 1} tries: {err}") from err
                log.warning("%s: judge request failed (%s); retry %d/%d", self.name, err, attempt + 1, self.retries)
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        if self._pool is None:
            return torch.tensor([self._one(img, p) for img, p in zip(images, prompts)], dtype=torch.float32)
        return torch.tensor(list(self._pool.map(self._one, images, prompts)), dtype=torch.float32)


def _vlm_judge(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> LocalVLMJudge:
    return LocalVLMJudge("vlm_judge", path, device=device, **options)


def _http_judge(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> HTTPJudge:
    return HTTPJudge("http_judge", path, device=device, **options)
