"""An evaluation's reward calls (the one before step 1 included) follow reward.retries as a step's do."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from services.config import load_config
from services.training.evaluator import RunEvaluator
from services.training.remote import CallStats
from services.training.workers import LocalPool

pytestmark = pytest.mark.service


class EvalSet:
    prompts, metadata = ("a digit 1", "a digit 2"), None

    def __len__(self) -> int:
        return len(self.prompts)


class Sampler:
    def eval_samples(self, prompts, *, num_steps, **_):
        return {"images": torch.full((len(prompts), 3, 8, 8), 0.5), "ratio": torch.ones(num_steps, len(prompts))}


class FlakyScorer:
    """Fails its first ``fail`` calls, then scores every image 0.25."""

    def __init__(self, fail: int) -> None:
        self.fail, self.calls = fail, 0

    def score(self, images, prompts, *, group_ids, metadata):
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError("reward replica lost")
        return {"digits_ink": torch.full((len(prompts),), 0.25)}


def _evaluator(tmp_path, scorer, retries: int, stats: CallStats) -> RunEvaluator:
    over = tiny_overrides(tmp_path, "evr", **{"reward.retries": retries})
    cfg = load_config(None, over)
    pools = {"samplers": LocalPool([Sampler()]), "scorers": LocalPool([scorer])}
    return RunEvaluator(cfg, **pools, eval_set=EvalSet(), eval_names=[], stats=stats)


def test_a_failed_reward_call_in_an_evaluation_is_retried_and_counted(tmp_path):
    stats = CallStats()
    scorer = FlakyScorer(fail=1)
    metrics, _, _ = _evaluator(tmp_path, scorer, retries=2, stats=stats)()
    assert metrics  # the evaluation finished, with the retried call's scores
    assert all(v == pytest.approx(0.25) for k, v in metrics.items() if "digits_ink" in k)
    assert any("digits_ink" in k for k in metrics)
    assert stats.retries == 1 and stats.failures == 0
    assert scorer.calls == 3  # one failed and its retry for the few-step set, one for the full-step set


def test_an_evaluation_gives_up_after_reward_retries(tmp_path):
    stats = CallStats()
    scorer = FlakyScorer(fail=10)
    with pytest.raises(RuntimeError, match=r"eval_reward\.score failed after 2 tries: ConnectionError"):
        _evaluator(tmp_path, scorer, retries=1, stats=stats)()
    assert scorer.calls == 2 and stats.failures == 1 and stats.by_name == {"eval_reward": 1}
