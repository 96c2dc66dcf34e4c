"""End-to-end samples/s of the Ray training service over a plain single-process loop doing the
same work (same config, same seeds), measured side by side in one run: the synchronous loop, and
the pipelined one (``train.pipeline=async``: the next step's rollout and rewards are made while the
learner updates) with the same actors. Goals: async >= 1.25x the sync service, >= 1.0x the loop.
``--hybrid`` adds ``resources.placement=hybrid`` (the learner worker samples; no sampler actors, no
weight sync), with the learner's default threads and with every core, against the default sync arm.

    RAY_AUTH_MODE=disabled python benchmarks/bench_service.py [--steps 8] [--hybrid]
"""

import argparse
import statistics
import tempfile

from services.config import load_config
from services.training.run import run_training


def _rate(summary) -> float:
    """Samples over the wall time of steps 2..N (the first step has nothing overlapping it, and warms up)."""
    rows = [r for r in summary.history if "perf/samples_per_s" in r][1:]
    return sum(r["perf/samples_per_s"] * _step_s(r) for r in rows) / sum(_step_s(r) for r in rows)


def _step_s(r: dict) -> float:
    return r["perf/wait_experience_s"] + r["perf/learner_s"] + r["perf/sync_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2, help="threads of the single-process loop")
    ap.add_argument("--learner-threads", action="store_true", help="also the arms with learner_threads=cores")
    ap.add_argument("--hybrid", action="store_true", help="also resources.placement=hybrid (learners sample)")
    ap.add_argument("--only-hybrid", action="store_true", help="the loop, the default sync arm and the hybrid arms")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="ng-bench-")
    common = [
        f"train.steps={args.steps}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        f"train.output_dir={out}",
        "eval.num_prompts=1",
        "eval.samples_per_prompt=2",
        "eval.full_steps=4",
    ]
    local = run_training(
        load_config(
            None, common + ["train.run_name=local", "rollout.num_samplers=1", f"resources.torch_threads={args.cores}"]
        ),
        local=True,
        progress=False,
    )
    lt = f"resources.learner_threads={args.cores}"
    pipelined = ["train.pipeline=async", "rollout.max_staleness=1"]
    one = ["rollout.num_samplers=1"]
    arms = {  # name: overrides; each "async" row uses the actors of the "sync" row above it
        "sync (defaults: 2 samplers)": [],
        "async (defaults: 2 samplers)": pipelined,
        "sync, 1 sampler": one,
        "async, 1 sampler": [*one, *pipelined],
    }
    if args.only_hybrid:
        arms = {"sync (defaults: 2 samplers)": []}
    if args.hybrid or args.only_hybrid:
        arms["hybrid (the learner samples)"] = ["resources.placement=hybrid"]
        arms[f"hybrid, learner_threads={args.cores}"] = ["resources.placement=hybrid", lt]
    if args.learner_threads:
        arms[f"sync, learner_threads={args.cores}"] = [lt]
        arms[f"async, learner_threads={args.cores}"] = [lt, *pipelined]
    runs = {}
    for i, (name, over) in enumerate(arms.items()):
        runs[name] = run_training(load_config(None, [*common, f"train.run_name=ray{i}", *over]), progress=False)
    a = _rate(local)
    print(f"samples/s  {'single-process loop (' + str(args.cores) + ' threads)':<40}{a:.1f}")
    sync = default_sync = _rate(runs["sync (defaults: 2 samplers)"])
    for name, run in runs.items():
        b = _rate(run)
        sync = b if name.startswith("sync") else sync
        base = default_sync if name.startswith("hybrid") else sync  # hybrid: against the default sync arm
        print(
            f"samples/s  Ray service, {name:<32}{b:.1f}   x loop {b / a:.3f}   x sync {b / base:.3f}   ({_phases(run)})"
        )


def _phases(summary) -> str:
    rows = [r for r in summary.history if "perf/samples_per_s" in r][1:]
    keys = ("perf/rollout_s", "perf/reward_s", "perf/wait_experience_s", "perf/learner_s", "perf/sync_s")
    return ", ".join(f"{k.split('/')[1]} {statistics.median(r[k] for r in rows):.2f}" for k in keys)


if __name__ == "__main__":
    main()
