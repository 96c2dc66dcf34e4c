"""End-to-end samples/s of the Ray training service over a plain single-process loop doing the
same work (same config, same seeds), measured side by side in one run: the synchronous loop, and
the pipelined one (``train.pipeline=async``: the next step's rollout and rewards are made while the
learner updates) with the same actors. Goals: async >= 1.25x the sync service, >= 1.0x the loop.

    RAY_AUTH_MODE=disabled python benchmarks/bench_service.py [--steps 8]
"""

import argparse
import statistics
import tempfile

from services.config import load_config
from services.train import run_training


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
    ray_default = run_training(load_config(None, common + ["train.run_name=ray"]), progress=False)
    # the learner runs while the samplers wait: let it use both cores (samplers keep 1 thread each)
    lt = f"resources.learner_threads={args.cores}"
    ray_tuned = run_training(load_config(None, common + ["train.run_name=ray_lt", lt]), progress=False)
    pipelined = ["train.pipeline=async", "rollout.max_staleness=1"]
    ray_async = run_training(load_config(None, common + ["train.run_name=ray_async", *pipelined]), progress=False)
    a, sync = _rate(local), _rate(ray_default)
    print(f"samples/s  single-process ({args.cores} threads)          {a:.1f}")
    for name, run in (
        ("Ray service, sync (defaults)", ray_default),
        (f"Ray service, sync, learner_threads={args.cores}", ray_tuned),
        ("Ray service, async (same actors)", ray_async),
    ):
        b = _rate(run)
        print(f"samples/s  {name:<37}{b:.1f}   x loop {b / a:.3f}   x sync {b / sync:.3f}   ({_phases(run)})")


def _phases(summary) -> str:
    rows = [r for r in summary.history if "perf/samples_per_s" in r][1:]
    keys = ("perf/rollout_s", "perf/reward_s", "perf/wait_experience_s", "perf/learner_s", "perf/sync_s")
    return ", ".join(f"{k.split('/')[1]} {statistics.median(r[k] for r in rows):.2f}" for k in keys)


if __name__ == "__main__":
    main()
