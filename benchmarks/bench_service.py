"""End-to-end samples/s of the Ray training service over a plain single-process loop doing the
same work (same config, same seeds), measured side by side in one run. Goal: >= 0.9.

    RAY_AUTH_MODE=disabled python benchmarks/bench_service.py [--steps 6]
"""

import argparse
import statistics
import tempfile

from services.config import load_config
from services.train import run_training


def _rate(summary) -> float:
    rows = [r for r in summary.history if "perf/samples_per_s" in r][1:]  # skip the first (warm-up) step
    return statistics.median(r["perf/samples_per_s"] for r in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
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
    ray_tuned = run_training(
        load_config(None, common + ["train.run_name=ray_lt", f"resources.learner_threads={args.cores}"]),
        progress=False,
    )
    a = _rate(local)
    print(f"samples/s  single-process ({args.cores} threads)          {a:.1f}")
    for name, run in (
        ("Ray service (defaults)", ray_default),
        (f"Ray service, learner_threads={args.cores}", ray_tuned),
    ):
        b = _rate(run)
        print(f"samples/s  {name:<37}{b:.1f}   ratio {b / a:.3f}   ({_phases(run)})")


def _phases(summary) -> str:
    rows = [r for r in summary.history if "perf/samples_per_s" in r][1:]
    keys = ("perf/rollout_s", "perf/reward_s", "perf/learner_s", "perf/sync_s")
    return ", ".join(f"{k.split('/')[1]} {statistics.median(r[k] for r in rows):.2f}" for k in keys)


if __name__ == "__main__":
    main()
