"""Every metric of short in-process runs, written exactly (``float.hex``), to compare two versions of
the code bit for bit: a refactor that must not change behaviour (issue #27) prints the same file.

Each case is a 3-step local run of the embedded digits task (tiny generator, 5 pretrain steps, the
same as the tests) through :func:`services.training.run.run_training`: every method, with NormGuard
off, as a penalty and as a constraint (floor and probes), a KL arm, GRPO-Guard, AWM's PPO clip and
EMA-KL, two mini-batches per step, the pipelined loop, and an evaluation and checkpoint midway.
Timings (``perf/*``) are left out; everything else, training and evaluation, is kept.

    python benchmarks/metrics_fingerprint.py --out /tmp/before.json
    ...change the code...
    python benchmarks/metrics_fingerprint.py --out /tmp/after.json --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

CASES: dict[str, list[str]] = {
    "nft-none": ["loss.name=diffusion_nft", "normguard.weight=0"],
    "nft-penalty": ["loss.name=diffusion_nft", "normguard.weight=0.5", "learner.updates_per_step=2"],
    "nft-constraint": ["loss.name=diffusion_nft", "normguard.mode=constraint", "normguard.margin=0.0"],
    "nft-async": ["loss.name=diffusion_nft", "normguard.weight=0.5", "train.pipeline=async"],
    "awm-constraint": [
        "loss.name=awm",
        "normguard.mode=constraint",
        "normguard.margin=0.0",
        "loss.clip_range=0.2",
        "loss.ema_kl_weight=0.1",
    ],
    "awm-kl": ["loss.name=awm", "loss.kl_weight=1.0", "loss.kl_form=elbo"],
    "dpo-penalty": ["loss.name=flow_dpo", "loss.beta=50", "normguard.weight=1.0"],
    "dpo-constraint": ["loss.name=flow_dpo", "loss.beta=50", "normguard.mode=constraint", "normguard.margin=0.0"],
    "grpo-penalty": ["loss.name=flow_grpo", "rollout.sde_noise_level=0.7", "normguard.weight=0.5"],
    "grpo-guard": ["loss.name=flow_grpo", "rollout.sde_noise_level=0.7", "loss.guard=true", "loss.kl_weight=4.0"],
    "grpo-constraint": [
        "loss.name=flow_grpo",
        "rollout.sde_noise_level=0.7",
        "normguard.mode=constraint",
        "normguard.margin=0.0",
    ],
}

TINY = {
    "model.pretrain_steps": 5,
    "train.steps": 3,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "rollout.prompts_per_step": 2,
    "rollout.group_size": 4,
    "rollout.num_samplers": 1,
    "rollout.num_steps": 4,
    "learner.micro_batch": 16,
    "learner.timesteps_per_sample": 2,
    "eval.num_prompts": 2,
    "eval.samples_per_prompt": 2,
    "eval.full_steps": 6,
    "eval.few_steps": 2,
    "eval.renorm_along": "true",
    "logging.log_images": "false",
}


def _exact(x):
    if isinstance(x, float):
        return x.hex()
    if isinstance(x, dict):
        return {k: _exact(v) for k, v in sorted(x.items()) if not k.startswith("perf/")}
    if isinstance(x, list):
        return [_exact(v) for v in x]
    return x


def fingerprint(cases: list[str], work: Path) -> dict:
    os.environ["NORMGUARD_CACHE"] = str(work / "cache")
    from services.config import load_config
    from services.prepare import prepare_embedded
    from services.training.run import run_training

    prepare_embedded(pretrain_steps=TINY["model.pretrain_steps"], num_fake=200, log=lambda s: None)
    out = {}
    for name in cases:
        over = [f"{k}={v}" for k, v in TINY.items()]
        over += [f"train.output_dir={work / 'runs'}", f"train.run_name={name}", *CASES[name]]
        t = time.perf_counter()
        summary = run_training(load_config(None, over), local=True, progress=False)
        out[name] = _exact({"history": summary.history, "before": summary.before, "after": summary.after})
        print(f"{name}: {len(summary.history)} records, {time.perf_counter() - t:.0f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a previous --out: report every case and key that differs")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = fingerprint(args.cases, Path(tmp))
    Path(args.out).write_text(json.dumps(got, indent=1, sort_keys=True))
    if not args.compare:
        return 0
    ref = json.loads(Path(args.compare).read_text())
    bad = 0
    for name in args.cases:
        a, b = ref.get(name), got[name]
        if a == b:
            print(f"{name}: identical")
            continue
        bad += 1
        diffs = []
        for part in ("before", "after"):
            diffs += [f"{part}:{k}" for k in sorted(set(a[part]) | set(b[part])) if a[part].get(k) != b[part].get(k)]
        for i, (ra, rb) in enumerate(zip(a["history"], b["history"])):
            diffs += [f"history[{i}]:{k}" for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
        if len(a["history"]) != len(b["history"]):
            diffs.append(f"history length {len(a['history'])} != {len(b['history'])}")
        print(f"{name}: DIFFERS in {len(diffs)} keys: {', '.join(diffs[:12])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
