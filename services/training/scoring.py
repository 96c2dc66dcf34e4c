"""RewardScorer workers: plain classes that hold scorers; the coordinator wraps them as actors.

A worker builds its scorers once, then scores batches: :meth:`ScorerWorker.score_batch` takes a
:class:`~services.types.ScoreRequest` and returns a :class:`~services.types.ScoreResult` (per-scorer
``(B,)`` scores and the wall time), a per-image scorer ``reward.score_batch`` images per call. Videos
``(B, F, 3, H, W)`` (a video family's samples) are scored frame by frame and averaged over the frames, one frame
index per call (so a call holds ``B`` frames, chunked as images are), unless the scorer takes clips
(``takes_clips = True``: :func:`services.rewards.base.takes_clips`), which gets them whole. Timeouts,
retries with backoff and failure counting live in the coordinator's ``call_with_retries`` (one policy for
every remote call).

A required scorer's error fails the call, for that policy. An optional one (``required: false``) is tried
``reward.retries`` more times here, with the same backoff, and then left out of the reply
(``ScoreResult.failed`` says why), so the step trains on the others: the same for a scorer in this process
and one on a reward server (``services.rewards.remote``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from services.rewards import build_scorer, is_groupwise, takes_clips
from services.training.probe import ActorProbe, probe_process
from services.types import ScorerBuild, ScoreRequest, ScoreResult

__all__ = ["ScorerWorker"]

log = logging.getLogger(__name__)


def _takes_metadata(scorer) -> bool:
    import inspect

    try:
        return "metadata" in inspect.signature(scorer.score).parameters
    except (TypeError, ValueError):
        return False


class ScorerWorker:
    """Holds a set of named scorers (``{name: ScorerBuild}``) and scores batches."""

    def __init__(
        self,
        specs: dict[str, ScorerBuild],
        *,
        device: str = "cpu",
        torch_threads: int = 1,
        score_batch: int | None = None,
        retries: int = 0,
        backoff_s: float = 0.5,
    ):
        """``score_batch``: ``reward.score_batch``, images per call of a per-image scorer (``None``: all);
        ``retries``: ``reward.retries``, the tries an optional scorer gets after its first."""
        torch.set_num_threads(torch_threads)
        self._chunk = score_batch  # not self.score_batch: that is the request method
        self.retries, self.backoff_s = retries, backoff_s
        self.optional = frozenset(name for name, b in specs.items() if not b.required)
        self.failed: dict[str, str] = {}  # the last score() call's optional scorers left out
        self.scorers = {
            name: build_scorer(name, path=b.path, device=device, options=dict(b.options), impl=b.impl)
            for name, b in specs.items()
        }
        self._takes_metadata = {name: _takes_metadata(sc) for name, sc in self.scorers.items()}  # once, not per call

    def score(
        self,
        images: Tensor,
        prompts: Sequence[str],
        names: Sequence[str] | None = None,
        group_ids: Tensor | None = None,
        metadata: Sequence[dict | None] | None = None,
    ) -> dict[str, Tensor]:
        """``{name: (B,) scores}`` for the requested scorers (all by default).

        ``group_ids`` ``(B,)`` is passed to the group-wise scorers; without it the whole batch is
        one group for them. ``metadata`` (one row per image, from a .jsonl / .csv prompt file) is passed
        to the scorers whose ``score`` takes a ``metadata`` argument (rule-based rewards).
        """
        groups = group_ids if group_ids is not None else torch.zeros(len(prompts), dtype=torch.long)
        out, self.failed = {}, {}
        for n in names or self.scorers:
            if n not in self.optional:
                out[n] = self._one(n, images, list(prompts), groups, metadata)
            elif (got := self._optional(n, images, list(prompts), groups, metadata)) is not None:
                out[n] = got
        return out

    def _optional(self, n: str, images: Tensor, prompts: list[str], groups: Tensor, metadata) -> Tensor | None:
        """An optional scorer's scores, tried ``1 + retries`` times with backoff; ``None`` (and the error in
        ``self.failed``) when every try failed."""
        for attempt in range(self.retries + 1):
            try:
                return self._one(n, images, prompts, groups, metadata)
            except Exception as err:  # noqa: BLE001 - an optional scorer: retried, then left out, logged
                self.failed[n] = f"{type(err).__name__}: {err}"
                last = attempt == self.retries
                log.warning(
                    "optional scorer %s failed (try %d/%d): %s%s",
                    n,
                    attempt + 1,
                    self.retries + 1,
                    self.failed[n],
                    "; left out of this batch's reward" if last else "",
                    exc_info=last,
                )
                if not last:
                    time.sleep(self.backoff_s * 2**attempt)
        return None

    def _one(self, n: str, images: Tensor, prompts: list[str], groups: Tensor, metadata) -> Tensor:
        """Scorer ``n``'s ``(B,)`` scores, checked. Videos ``(B, F, 3, H, W)``: whole clips to a scorer that
        takes them (``takes_clips``), else frame ``f`` of every sample per call and the mean over frames."""
        if images.ndim == 5 and not takes_clips(self.scorers[n]):
            return torch.stack(
                [self._images(n, images[:, f], prompts, groups, metadata) for f in range(images.shape[1])]
            ).mean(0)
        return self._images(n, images, prompts, groups, metadata)

    def _images(self, n: str, images: Tensor, prompts: list[str], groups: Tensor, metadata) -> Tensor:
        scorer = self.scorers[n]
        kw = {"metadata": list(metadata)} if metadata is not None and self._takes_metadata[n] else {}
        if is_groupwise(scorer):  # a group is scored whole
            s = scorer.score(images, prompts, groups, **kw)
        else:
            s = self._chunked(scorer, images, prompts, kw.get("metadata"))
        if s.shape != (len(prompts),) or not torch.isfinite(s).all():
            raise ValueError(f"scorer {n} returned {tuple(s.shape)} / non-finite scores for {len(prompts)} images")
        return s

    def _chunked(self, scorer, images: Tensor, prompts: list[str], metadata: list | None) -> Tensor:
        """A per-image scorer's ``(B,)`` scores, ``score_batch`` images per call, concatenated."""
        step = self._chunk or len(prompts) or 1
        parts = []
        for i in range(0, max(len(prompts), 1), step):
            kw = {"metadata": metadata[i : i + step]} if metadata is not None else {}
            parts.append(scorer.score(images[i : i + step], prompts[i : i + step], **kw))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def score_batch(self, req: ScoreRequest) -> ScoreResult:
        """:meth:`score` of one request (one argument, for the coordinator's fan-out), with its wall time."""
        t0 = time.perf_counter()
        scores = self.score(req.images, req.prompts, group_ids=req.group_ids, metadata=req.metadata)
        return ScoreResult(scores=scores, seconds=time.perf_counter() - t0, failed=dict(self.failed))

    def features(self, name: str, images: Tensor) -> Tensor:
        """Feature vectors of a scorer that has them (Frechet distance)."""
        return self.scorers[name].features(images).cpu()

    def names(self) -> list[str]:
        return list(self.scorers)

    def probe(self) -> ActorProbe:
        """This scorer process's peak memory (reads only; scorers have no common module to list)."""
        return probe_process()
