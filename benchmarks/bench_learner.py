"""Learner step time with NormGuard over without, measured side by side in one run.

Two comparisons on the embedded default's transformer (same batch, same seeds):
* DiffusionNFT: base loss alone (no reference forward at all) vs base + NormGuard (adds the
  one no-grad reference forward + the hinge). Expected: about the cost of that forward.
* Flow-DPO (its base loss already computes the reference): without vs with NormGuard.
  Goal: <= 1.15x.

    python benchmarks/bench_learner.py [--repeats 5] [--samples 80]
"""

import argparse
import statistics
import time

import torch

from services.config import load_config
from services.prepare import prepare_embedded
from services.training.learner import Learner
from services.training.rollout import RolloutSampler
from services.types import RolloutRequest, TrainBatch


def _batch(cfg, model_path, n):
    sampler = RolloutSampler(cfg.model, model_path)
    prompts = [f"a handwritten digit {i % 10}" for i in range(n)]
    rb = sampler.generate(
        RolloutRequest(prompts=prompts, group_ids=[i // 8 for i in range(n)], seeds=list(range(n)), num_steps=10)
    )
    adv = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return rb, prompts, adv


def _time(cfg, model_path, batch, repeats):
    learner = Learner.from_config(cfg, model_path)
    learner.update(batch)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        learner.update(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=80)
    args = ap.parse_args()
    torch.set_num_threads(2)
    assets = prepare_embedded()
    path = str(assets.model_path)
    base = [
        "learner.micro_batch=40",
        "learner.timesteps_per_sample=2",
        "resources.torch_threads=2",
        "learner.track_old_policy_gap=false",
    ]
    rb, prompts, adv = _batch(load_config(None, base), path, args.samples)
    nft_batch = TrainBatch(
        latents=rb.latents,
        prompts=prompts,
        advantages=adv,
        reward_prob=(adv / 4 + 0.5).clamp(0, 1),
        step=0,
        rank=0,
        shard_units=(args.samples,),
    )
    p = args.samples // 2
    dpo_batch = TrainBatch(
        latents=rb.latents,
        prompts=prompts,
        advantages=adv,
        reward_prob=adv,
        step=0,
        rank=0,
        shard_units=(p,),
        num_pairs=p,
    )
    rows = []
    for loss, batch, extra in (("diffusion_nft", nft_batch, []), ("flow_dpo", dpo_batch, ["loss.beta=50"])):
        # NormGuard's own cost: no KL term (it would compute the reference forward in both arms)
        same = base + extra + [f"loss.name={loss}", "loss.kl_weight=0"]
        off = load_config(None, same + ["normguard.weight=0", "learner.track_norm_ratio=false"])
        on = load_config(None, same + ["normguard.weight=1"])
        t_off, t_on = _time(off, path, batch, args.repeats), _time(on, path, batch, args.repeats)
        rows.append((loss, t_off, t_on, t_on / t_off))
    print(f"learner step, {args.samples} samples x 2 sigmas, median of {args.repeats} (s)")
    print(f"{'base loss':15s} {'without NG':>11s} {'with NG':>9s} {'ratio':>7s}")
    for loss, a, b, r in rows:
        print(f"{loss:15s} {a:11.3f} {b:9.3f} {r:7.3f}x")


if __name__ == "__main__":
    main()
