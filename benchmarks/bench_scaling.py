"""How the orchestration scales past this machine: simulated actors whose work is a timed wait.

The real :class:`services.training.coordinator.Coordinator` drives Ray actors that stand in for GPU workers:
a sampler that "generates" ``--gen-ms`` per sample, a scorer that "scores" ``--score-ms`` per
sample, and a learner actor that "trains" ``--learn-ms`` per step and then ``ray.put``s weights
of the synced size, as rank 0 of the learner group does. Their work is ``time.sleep`` (standing in
for GPU time), so 2 CPU cores are not the limit: what is measured is what the service adds,
namely fan-out, gathering, concatenation, per-group scoring, shard building, the object store
and the weight sync.

1. Throughput scaling (weak scaling: 8 samples per sampler per step, one scorer per sampler, the
   learner's step time held constant as a data-parallel group that grows with the data would).
   Scaling efficiency = samples/s at N / (N x samples/s at 1); ideal is 1.0.
2. Weight sync: the policy versions the learner ships (``--sizes`` MB of float32) to N samplers.
   Each sampler copies them into its own parameters, as ``load_trainable_state_dict`` does. The
   table gives the per-step sync time, measured in the driver in sync mode, and the fraction of
   the step it takes.
   The async mode queues the sync behind the next rollout, so the table there gives the samplers'
   own ``set_weights`` time and the step time.

    RAY_AUTH_MODE=disabled python benchmarks/bench_scaling.py [--actors 1 2 4 8 16] [--sizes 16 128 512 2048]

Cells whose weight copies would not fit the memory budget (``--memory-gb``) are skipped and say so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from services.config import load_config
from services.training.coordinator import Coordinator
from services.training.workers import WorkerGroup
from services.types import RolloutBatch, ScoreResult

SAMPLES_PER_SAMPLER = 8
NUM_STEPS = 10  # sampler steps per rollout (only the norm-ratio array's length)


class SimSampler:
    """The RolloutSampler interface; ``generate`` sleeps ``gen_s`` per sample."""

    def __init__(self, gen_s: float) -> None:
        self.gen_s, self.version, self.params, self.sync_s = gen_s, 0, None, []

    def set_weights(self, state: dict, version: int) -> int:
        t0 = time.perf_counter()
        w = state["w"]
        if self.params is None or self.params.shape != w.shape:
            self.params = torch.empty_like(w)
        self.params.copy_(w)  # what load_trainable_state_dict does (into GPU memory on a real sampler)
        self.version = version
        self.sync_s.append(time.perf_counter() - t0)
        return version

    def get_version(self) -> int:
        return self.version

    def take_sync_times(self) -> list[float]:
        out, self.sync_s = self.sync_s, []
        return out

    def generate(self, req) -> RolloutBatch:
        b = len(req.prompts)
        time.sleep(self.gen_s * b)
        g = torch.Generator().manual_seed(req.seeds[0])
        return RolloutBatch(
            latents=torch.randn(b, 4, 8, 8, generator=g),
            images=torch.rand(b, 3, 16, 16, generator=g),
            prompts=list(req.prompts),
            group_ids=torch.tensor(req.group_ids),
            seeds=list(req.seeds),
            versions=torch.full((b,), self.version),
            norm_ratio=torch.ones(req.num_steps, b),
            sigmas=torch.linspace(1, 0, req.num_steps + 1),
        )


class SimScorer:
    """The ScorerWorker interface; ``score_batch`` sleeps ``score_s`` per sample."""

    def __init__(self, score_s: float, names: list[str]) -> None:
        self.score_s, self.names = score_s, names

    def score_batch(self, req) -> ScoreResult:
        t0 = time.perf_counter()
        time.sleep(self.score_s * len(req.prompts))
        s = req.images.mean(dim=(1, 2, 3))
        return ScoreResult(scores={n: s for n in self.names}, seconds=time.perf_counter() - t0)


class SimLearnerActor:
    """Rank 0 of a learner group: sleeps ``learn_s`` per step, then puts ``size_mb`` of weights."""

    def __init__(self) -> None:
        self.w = torch.zeros(1)
        self.version = 0

    def resize(self, size_mb: float) -> list:
        self.w, self.version = torch.ones(int(size_mb * 2**20 / 4)), 0
        return [ray.put({"w": self.w})]

    def update(self, learn_s: float) -> tuple[dict, list, int]:
        time.sleep(learn_s)
        self.version += 1
        self.w[0] = self.version  # a new policy each step
        return {"learner/updates": 1.0, "loss/total": 0.0}, [ray.put({"w": self.w})], self.version


class SimLearnerGroup:
    """The LearnerGroup interface, in the driver, over one :class:`SimLearnerActor`."""

    world_size = 1
    extra: dict = {}

    def __init__(self, actor, learn_s: float, size_mb: float) -> None:
        self.actor, self.learn_s = actor, learn_s
        self._ref = ray.get(actor.resize.remote(size_mb), timeout=600)[0]
        self.version = 0

    def weights(self):
        return self._ref

    def update(self, shards):
        metrics, refs, self.version = ray.get(self.actor.update.remote(self.learn_s), timeout=600)
        self._ref = refs[0]
        return metrics, self._ref

    def stop(self) -> None:
        pass


def _cfg(n: int, steps: int, pipeline: str):
    return load_config(
        None,
        [
            f"rollout.num_samplers={n}",
            f"reward.num_actors={n}",
            f"rollout.prompts_per_step={2 * n}",
            "rollout.group_size=4",
            f"rollout.num_steps={NUM_STEPS}",
            f"train.steps={steps}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            f"train.pipeline={pipeline}",
            f"rollout.max_staleness={1 if pipeline == 'async' else 0}",
        ],
    )


def run_cell(pool: dict, n: int, pipeline: str, args, size_mb: float) -> dict:
    """Steps of the real coordinator on the first ``n`` simulated samplers / scorers."""
    cfg = _cfg(n, args.steps, pipeline)
    samplers, scorers = pool["samplers"][:n], pool["scorers"][:n]
    learner = SimLearnerGroup(pool["learner"], args.learn_ms / 1000, size_mb)
    coord = Coordinator(cfg, workers=WorkerGroup.of_actors(samplers, scorers, learner))
    coord.sync_samplers()
    ray.get([s.take_sync_times.remote() for s in samplers], timeout=600)
    rows = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        rows.append(coord.step().metrics)
    wall = time.perf_counter() - t0
    coord.finish()
    rows = rows[1:]  # the first step makes its experience with nothing overlapping it
    sync_times = [t for s in samplers for t in ray.get(s.take_sync_times.remote(), timeout=600)]
    step_s = statistics.median(cfg.samples_per_step / r["perf/samples_per_s"] for r in rows)
    return {
        "samples_per_s": statistics.median(r["perf/samples_per_s"] for r in rows),
        "overall_samples_per_s": cfg.samples_per_step * args.steps / wall,
        "step_s": step_s,
        "driver_sync_s": statistics.median(r["perf/sync_s"] for r in rows),
        "sampler_set_weights_s": statistics.median(sync_times) if sync_times else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--sizes", type=float, nargs="+", default=[16, 128, 512, 2048], help="synced MB")
    ap.add_argument("--sync-samplers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gen-ms", type=float, default=50.0, help="simulated generation time per sample")
    ap.add_argument("--score-ms", type=float, default=10.0, help="simulated scoring time per sample")
    ap.add_argument("--learn-ms", type=float, default=400.0, help="simulated learner time per step")
    ap.add_argument("--memory-gb", type=float, default=10.0, help="memory budget for the weight copies")
    args = ap.parse_args()

    top = max(max(args.actors), max(args.sync_samplers))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    names = [s.name for s in load_config(None, []).reward.scorers]
    opts = {"num_cpus": 0, "max_restarts": 0}
    pool = {
        "samplers": [ray.remote(SimSampler).options(**opts).remote(args.gen_ms / 1000) for _ in range(top)],
        "scorers": [ray.remote(SimScorer).options(**opts).remote(args.score_ms / 1000, names) for _ in range(top)],
        "learner": ray.remote(SimLearnerActor).options(**opts).remote(),
    }
    ray.get([s.get_version.remote() for s in pool["samplers"]], timeout=600)  # every process is up
    ideal_sync = (SAMPLES_PER_SAMPLER * (args.gen_ms + args.score_ms) + args.learn_ms) / 1000
    ideal_async = max(SAMPLES_PER_SAMPLER * (args.gen_ms + args.score_ms), args.learn_ms) / 1000
    print(
        f"simulated work per step: generate {SAMPLES_PER_SAMPLER} x {args.gen_ms:.0f} ms, score "
        f"{SAMPLES_PER_SAMPLER} x {args.score_ms:.0f} ms per actor, learn {args.learn_ms:.0f} ms; ideal step "
        f"{ideal_sync:.2f} s sync, {ideal_async:.2f} s async; median of steps 2..{args.steps}\n"
    )

    print("1. throughput vs actors (N samplers + N scorers, 8 samples per sampler; LoRA-sized 16 MB sync)")
    print(f"{'N':>3} {'mode':>6} {'samples/s':>10} {'step s':>7} {'efficiency':>10} {'vs sync':>8}")
    base: dict[str, float] = {}
    breaks: dict[str, int | None] = {"sync": None, "async": None}
    for n in args.actors:
        sync_rate = None
        for mode in ("sync", "async"):
            r = run_cell(pool, n, mode, args, 16)
            base.setdefault(mode, r["samples_per_s"])
            eff = r["samples_per_s"] / (n * base[mode])
            if eff < 0.9 and breaks[mode] is None:
                breaks[mode] = n
            sync_rate = r["samples_per_s"] if mode == "sync" else sync_rate
            speedup = r["samples_per_s"] / sync_rate
            print(f"{n:>3} {mode:>6} {r['samples_per_s']:>10.1f} {r['step_s']:>7.3f} {eff:>10.3f} {speedup:>7.2f}x")
    for mode, n in breaks.items():
        print(
            f"   {mode}: efficiency {'stays >= 0.9 up to N=' + str(max(args.actors)) if n is None else f'< 0.9 from N={n}'}"
        )

    print("\n2. weight sync vs synced size and samplers (N samplers and scorers)")
    print(f"{'MB':>6} {'N':>3} {'mode':>6} {'driver sync s':>13} {'set_weights s':>13} {'step s':>7} {'sync/step':>9}")
    for size in args.sizes:
        for n in args.sync_samplers:
            # each sampler holds a deserialised copy and its parameters; the object store two versions,
            # the learner its own (measured: 512 MB x 16 samplers ran a 24 GiB machine out of memory)
            need = size * (2 * n + 3) / 1024
            if need > args.memory_gb:
                print(f"{size:>6.0f} {n:>3}   skipped: needs ~{need:.1f} GB > --memory-gb {args.memory_gb}")
                continue
            for mode in ("sync", "async"):
                r = run_cell(pool, n, mode, args, size)
                frac = r["driver_sync_s"] / r["step_s"]
                print(
                    f"{size:>6.0f} {n:>3} {mode:>6} {r['driver_sync_s']:>13.3f} {r['sampler_set_weights_s']:>13.3f} "
                    f"{r['step_s']:>7.3f} {frac:>9.3f}"
                )
    ray.shutdown()


if __name__ == "__main__":
    main()
