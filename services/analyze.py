"""``normguard analyze RUN_DIR``: the adjoint sensitivity of the reward to velocity magnitude.

For the base model and the run's trained policy, on the same noise and prompts, computes
``g_{k,b} = d R_b / d s_{k,b}`` at ``s = 1`` (``normguard_core.analysis.magnitude_sensitivity``)
with the differentiable reward proxy, and prints per-step batch mean, std, sign agreement and
t-statistic: is there a coherent first-order reward signal in velocity magnitude at batch level?
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from normguard_core.analysis import AdjointSensitivity, magnitude_sensitivity
from normguard_core.conventions import sigma_grid
from services.config.families import require
from services.report import format_table
from services.rewards.base import DifferentiableScorer, RewardScorer

__all__ = ["adjoint_report"]


def _rows(name: str, res: AdjointSensitivity, sigmas: torch.Tensor) -> list[dict]:
    return [
        {
            "model": name,
            "step": k,
            "sigma": float(sigmas[k]),
            "mean dR/ds": float(res.mean[k]),
            "std": float(res.std[k]),
            "sign_agree": float(res.sign_agreement[k]),
            "t": float(res.t_stat[k]),
        }
        for k in range(len(res.mean))
    ]


def _differentiable(scorer: RewardScorer) -> DifferentiableScorer:
    if not isinstance(scorer, DifferentiableScorer):
        raise TypeError(f"analyze needs a scorer with differentiable_score; {scorer.name!r} has none")
    return scorer


def adjoint_report(run_dir: str | Path, *, steps: int = 10, samples: int = 40, seed: int = 0) -> list[dict]:
    """Adjoint sensitivities of the base and trained models of a digits run; writes adjoint.json/png."""
    from services.checkpoints import load_weights
    from services.config import ExperimentConfig
    from services.data.digits import digit_prompt
    from services.models import build_generator
    from services.models.sampling import fixed_noise
    from services.prepare import prepare_embedded
    from services.rewards import build_scorer

    run_dir = Path(run_dir)
    cfg = ExperimentConfig.model_validate_json((run_dir / "config.json").read_text())
    require(cfg.model.kind, "digits", "analyze uses the differentiable digits reward proxy; model.kind: 'digits'")
    assets = prepare_embedded(
        resolution=cfg.model.resolution, pretrain_steps=cfg.model.pretrain_steps, cache_dir=cfg.model.cache_dir
    )
    spec = cfg.reward.scorers[0]  # the run's reward proxy (digits_ink by default), differentiable
    if not spec.name.startswith("digits_") or spec.impl:
        raise ValueError(f"analyze needs a differentiable embedded digits proxy; the run's reward is {spec.name!r}")
    scorer = _differentiable(build_scorer(spec.name, path=str(assets.scorer_path), options=spec.options))
    prompts = [digit_prompt(i % 10) for i in range(samples)]
    assert cfg.rollout.shift is not None, "ExperimentConfig fills in the digits grid's shift (_digits_grid)"
    sigmas = sigma_grid(steps, shift=cfg.rollout.shift)
    rows, out = [], {}
    for name in ("base", "trained"):
        gen = build_generator(cfg.model, path=str(assets.model_path))
        if name == "trained":
            gen.load_trainable_state_dict(load_weights(run_dir))
        for p in gen.transformer.parameters():
            p.requires_grad_(False)
        cond = gen.encode_prompts(prompts)
        noise = fixed_noise(gen, samples, seed)
        res = magnitude_sensitivity(
            lambda x, s, g=gen, c=cond: g.velocity(x, s, c),
            lambda x0, g=gen: scorer.differentiable_score(g.decode(x0), prompts),
            noise,
            sigmas,
        )
        rows += _rows(name, res, sigmas)
        out[name] = {
            "mean": res.mean.tolist(),
            "std": res.std.tolist(),
            "sign_agreement": res.sign_agreement.tolist(),
            "t_stat": res.t_stat.tolist(),
            "reward": float(res.reward.mean()),
        }
    (run_dir / "adjoint.json").write_text(json.dumps(out, indent=2))
    _plot(out, run_dir / "adjoint.png")
    print(format_table(rows))
    return rows


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, r in out.items():
        k = range(len(r["mean"]))
        axes[0].errorbar(k, r["mean"], yerr=r["std"], marker="o", capsize=2, label=name)
        axes[1].plot(k, r["sign_agreement"], marker="o", label=name)
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set_title("dR/ds_k at s=1 (mean +- std over batch)")
    axes[1].set_title("sign agreement")
    for ax in axes:
        ax.set_xlabel("sampling step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
