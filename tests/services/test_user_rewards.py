"""Training with a reward given by import path (a module under tests/) and with a group-wise scorer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides

from services.config import load_config
from services.training.build import build_coordinator
from services.training.scoring import ScorerWorker
from services.types import ScorerBuild

pytestmark = pytest.mark.service

SCORERS = (
    "reward.scorers=[{name: ink, impl: 'user_rewards:InkScorer', options: {scale: 2.0}},"
    " {name: ink_rank, impl: 'user_rewards:InkRankInGroup', weight: 0.5}]"
)


def test_training_with_import_path_and_groupwise_rewards(digits_assets, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tmp_path, "user-rewards", **{"rollout.prompts_per_step": 3}), SCORERS])
    coord, _, _ = build_coordinator(cfg, local=True)
    # a second scorer worker: 3 groups over 2 workers, and no worker may see part of a group
    specs = {
        "ink": ScorerBuild(options={"scale": 2.0}, impl="user_rewards:InkScorer"),
        "ink_rank": ScorerBuild(impl="user_rewards:InkRankInGroup"),
    }
    coord.scorers.append(ScorerWorker(specs))
    try:
        for _ in range(2):
            m = coord.step().metrics
            assert m["learner/updates"] >= 1
            # one winner per group of 4: exactly 1/4, only if no group was split between the workers
            assert m["reward/ink_rank"] == pytest.approx(1 / cfg.rollout.group_size)
            assert 0 < m["reward/ink"] <= 2.0
            assert m["reward/mean"] == pytest.approx(m["reward/ink"] + 0.5 * m["reward/ink_rank"], rel=1e-5)
    finally:
        coord.shutdown()
    for worker in coord.scorers:
        for groups in worker.scorers["ink_rank"].calls:
            counts = torch.unique(groups, return_counts=True)[1]
            assert (counts == cfg.rollout.group_size).all(), groups


def test_a_bad_import_path_fails_at_config_load():
    with pytest.raises(ValueError, match="impl"):
        load_config(None, ["reward.scorers=[{name: x, impl: 'not a path'}]"])
