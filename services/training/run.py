"""A training run end to end: ``run_training(cfg)``.

:class:`~services.training.controller.TrainController` carries it through its states
(``services.training.state``): the workers built on the backend the entry point picked
(``services.training.backends``: Ray, or plain objects in this process with ``local``) and resumed from
``<run_dir>/checkpoints/latest``, an evaluation before training, the RL steps with their evaluations and
checkpoints, a rollback when a guard says so, restarts when the failure policy says so, the evaluation
after training (with the inference-time renormalisation baseline), and plots, image grids and
``summary.json`` (``services.training.record``).
"""

from __future__ import annotations

import textwrap

from services.config import ExperimentConfig
from services.training.backends import backend_for
from services.training.build import build_coordinator
from services.training.controller import RunStopped, TrainController
from services.training.preemption import StopSignals
from services.training.record import RunSummary, window_mean

__all__ = ["RunStopped", "RunSummary", "build_coordinator", "run_training", "train_and_report", "window_mean"]


def run_training(
    cfg: ExperimentConfig,
    *,
    local: bool = False,
    progress: bool = True,
    on_step=None,
    on_finish=None,
    stop: StopSignals | None = None,
) -> RunSummary:
    """Train one configuration end to end; resumable by rerunning with the same run name. ``on_finish(coord)``
    runs once training and the after-training evaluation are done, before the actors are released (e.g.
    ``benchmarks/gpu_check.py`` reads every actor's peak memory there); an error in it fails the run.

    Failures go through :class:`~services.training.failure.FailurePolicy`: a lost learner worker
    (:class:`~services.training.learner_group.LearnerLost`) or a lost node is survived up to
    ``train.max_failures`` times by rebuilding everything from the newest intact checkpoint, exactly as
    a rerun would resume, and redoing the steps since (``metrics.jsonl`` keeps each step once; the restart
    is counted as ``faults/learner_restarts``); after a lost node the restart first waits, up to
    ``train.node_wait_s``, for the alive nodes to hold the run again, and otherwise stops with
    :class:`~services.training.nodes.NodeLost` naming the node. Any other error ends the run.

    SIGTERM / SIGINT (in the main thread: ``stop``, or the run's own :class:`StopSignals`) stop it at the next
    state boundary with the finished steps checkpointed, raising :class:`RunStopped`; rerun to resume."""
    backend = backend_for(local)
    controller = TrainController(
        cfg, backend=backend, progress=progress, on_step=on_step, on_finish=on_finish, stop=stop
    )
    return controller.run()


def train_and_report(cfg: ExperimentConfig, *, local: bool = False) -> str:
    """``normguard train``: the run (and, with ``train.compare_baseline``, the same config with NormGuard
    off), then their before / after table, run directories and the guards that fired. A stop signal during
    either run raises :class:`RunStopped` (one set of handlers over both: a signal during the first run's last
    evaluation stops the second before it starts)."""
    stop = StopSignals(cfg.train.stop_wait_s)
    try:
        summaries = {cfg.train.run_name: run_training(cfg, local=local, stop=stop)}
        if cfg.train.compare_baseline:
            ng = cfg.normguard.model_copy(update={"weight": 0.0, "mode": "penalty"})
            update = {"run_name": cfg.train.run_name + "-baseline", "compare_baseline": False}
            base = cfg.model_copy(update={"normguard": ng, "train": cfg.train.model_copy(update=update)})
            summaries[base.train.run_name] = run_training(base, local=local, stop=stop)
    finally:
        stop.restore()
    lines = [*short_report(cfg, summaries), ""]
    for name, s in summaries.items():
        lines.append(f"{name}: run directory {s.run_dir}")
        for g in s.guards:  # what the proxy could not see (train.guards)
            lines.append(
                f"  guard fired at step {g['step']}: {g['metric']} = {g['value']:.4g} {g['bound']} -> {g['action']}"
            )
    return "\n".join(lines)


def short_report(cfg: ExperimentConfig, summaries: dict[str, RunSummary]) -> list[str]:
    """The printed summary (``services.training.summary``: proxy, judges, norm ratio, at most 100 columns)
    and one sentence saying what it shows; every metric stays in each run's ``summary.json``."""
    from services.training.summary import short_summary, summary_columns, what_it_shows

    ev, judges = cfg.eval, [s.name for s in cfg.reward.eval_scorers or ()]
    judge = next((n for n in judges if n.endswith("_judge")), None)
    gaps = tuple(s.name for s in cfg.reward.eval_scorers or () if s.options.get("relative"))
    reward = cfg.reward.scorers[0].name
    cols = summary_columns(reward=reward, judge=judge, full=ev.full_steps, few=ev.few_steps, extra=gaps)
    names = list(summaries)
    baseline = names[1] if len(names) > 1 else None
    return [
        short_summary(summaries, cols),
        *textwrap.wrap(
            what_it_shows(summaries, guarded=names[0], baseline=baseline, reward=reward, full=ev.full_steps), 100
        ),
        "(every metric, before / after / +renorm: summary.json in each run directory)",
    ]
