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
        load_config(None, common + ["train.run_name=local", "rollout.num_samplers=1", "resources.torch_threads=2"]),
        local=True,
        progress=False,
    )
    ray_run = run_training(load_config(None, common + ["train.run_name=ray"]), progress=False)
    a, b = _rate(local), _rate(ray_run)
    print(f"samples/s  single-process {a:.1f}   Ray service {b:.1f}   ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
