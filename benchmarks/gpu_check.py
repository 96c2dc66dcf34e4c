"""One short run that checks the whole GPU path: tiny SD3 and FLUX through Ray, bf16, an NCCL learner group.

    python benchmarks/gpu_check.py                 # CUDA where Ray sees a GPU, else the CPU dry-run
    python benchmarks/gpu_check.py --device cpu    # the dry-run: gloo instead of NCCL, the same code path

For each family a tiny random pipeline and a tiny CLIP preference reward (PickScore's loader) are built from
configs into a temporary directory (``tests/tiny_models.py``, as the e2e tests build them), and
``services.training.run.run_training`` trains ``--steps`` RL steps of DiffusionNFT + NormGuard with LoRA and
``model.dtype: bfloat16``: Ray Train learner workers (NCCL on CUDA, gloo on CPU), two RolloutSampler actors
and a RewardScorer actor, the evaluation before and after training, a checkpoint at the end. On a GPU every
actor asks for a fraction of one, so everything fits one card:

* one GPU: one learner worker on half of it. NCCL cannot run two ranks of one communicator on one device
  ("Duplicate GPU detected"), so with one GPU the process group is NCCL but has a single rank, and no
  collective runs (the gradient all-reduce is skipped at world size 1);
* two or more: two learner workers on 0.75 of a GPU each (more than half, so Ray never packs both onto one
  card) and a real NCCL all-reduce each optimiser step;
* samplers 2 x 0.125 and the scorer 0.125 of a GPU beside them. Ray gives each actor its GPU as ``cuda:0``
  (``CUDA_VISIBLE_DEVICES``); Ray Train sets each worker's current device.

Once the after-training evaluation is done, every actor reports its own peak memory and where its weights live
(``services.training.probe``, read inside the actor through ``run_training``'s ``on_finish`` hook): on CUDA
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``, on CPU the process's peak RSS (``getrusage``).
One table gives per actor those peaks and the samples/s of its role at the last step (the first warms CUDA
kernels and the allocator): samplers the rollout samples / ``perf/rollout_s`` (all samplers together), scorers
samples / ``perf/reward_s``, learner ranks samples / ``perf/learner_s`` (the update and its shard transfer).
The exit status is 1 when a run failed or a check did not hold: every step updated, every metric finite, the
NormGuard ratio logged, a peak > 0 per actor, learner and sampler weights bf16 (frozen base) / fp32 (LoRA) on
the expected device (``problems``). The figures are of tiny models: the check is of the path, not of speed.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the tiny pipelines of the e2e tests
import tiny_models  # noqa: E402

from services.cluster.connect import ensure_ray  # noqa: E402
from services.config import load_config  # noqa: E402
from services.report import format_table  # noqa: E402
from services.training.probe import ActorProbe  # noqa: E402
from services.training.remote import call  # noqa: E402
from services.training.run import run_training  # noqa: E402

KINDS = ("sd3", "flux")
PROBE_TIMEOUT_S = 120.0
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red bicycle", "a lighthouse at dusk"]
SAMPLERS, SAMPLER_GPUS, SCORER_GPUS = 2, 0.125, 0.125


@dataclass
class FamilyCheck:
    """One family's run.

    Attributes:
        kind: ``sd3`` or ``flux``.
        device: ``cuda`` or ``cpu``: where the actors ran.
        learners: Ray Train learner workers.
        steps_wanted: RL steps asked for.
        wall_s: the run's wall time (Ray Train start-up, model loads and evaluations included).
        probes: ``{actor: ActorProbe}`` (``learner rank r``, ``sampler i``, ``scorer i``).
        rates: samples/s of each role at the last step (``rollout``, ``reward``, ``learner``).
        steps: the training rows of ``metrics.jsonl``.
        problems: the checks that did not hold (empty: passed).
    """

    kind: str
    device: str
    learners: int
    steps_wanted: int
    wall_s: float = 0.0
    probes: dict[str, ActorProbe] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def resources(num_gpus: int, learners: int | None = None) -> dict:
    """The ``resources`` section: everything on fractions of the GPUs (none with ``num_gpus`` 0, the dry-run)."""
    n = learners or (2 if num_gpus >= 2 else 1)
    res = {"num_learners": n, "learner_cpus": 0.5, "sampler_cpus": 0.25, "scorer_cpus": 0.25}
    if num_gpus == 0:
        return res
    if n > 1 and n > num_gpus:
        raise ValueError(f"{n} NCCL learner ranks need {n} GPUs (one rank per device), Ray sees {num_gpus}")
    share = 0.5 if n == 1 else 0.75  # over one half: two ranks never share a card
    return {**res, "learner_gpus": share, "sampler_gpus": SAMPLER_GPUS, "scorer_gpus": SCORER_GPUS}


def write_config(kind: str, root: Path, *, model: Path, clip: Path, res: dict, steps: int) -> Path:
    """A tiny run of ``kind``: DiffusionNFT + NormGuard, LoRA on a bf16 base, chunked rollouts and scoring."""
    cfg = {
        "model": {"kind": kind, "path": str(model), "lora_rank": 4, "resolution": 64, "dtype": "bfloat16"},
        "prompts": PROMPTS,
        "rollout": {
            **{"num_samplers": SAMPLERS, "prompts_per_step": 2, "group_size": 4, "num_steps": 2},
            **{"micro_batch": 2, "decode_batch": 2},  # 4 samples per sampler, 2 per transformer call / decode
        },
        "reward": {
            "scorers": [{"name": "pickscore", "path": str(clip)}],
            **{"eval_scorers": [], "num_actors": 1, "score_batch": 2},
        },
        "loss": {"name": "diffusion_nft"},
        "normguard": {"weight": 0.1},
        "learner": {"lr": 1e-3, "micro_batch": 2, "timesteps_per_sample": 1},
        "resources": res,
        "train": {"steps": steps, "eval_every": 0, "checkpoint_every": 0, "output_dir": str(root), "run_name": kind},
        "eval": {"num_prompts": 1, "samples_per_prompt": 1, "few_steps": 1, "full_steps": 2},
        "logging": {"log_images": False},
    }
    path = root / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def probe_actors(coord) -> dict[str, ActorProbe]:
    """Every actor's own report, read inside it (learner ranks through their command queues)."""
    out = {f"learner rank {r}": p for r, p in enumerate(coord.learner.probe())}
    for role, actors in (("sampler", coord.samplers), ("scorer", coord.scorers)):
        for i, actor in enumerate(actors):
            out[f"{role} {i}"] = call(actor, "probe", timeout_s=PROBE_TIMEOUT_S)
    return out


def _rates(row: dict, samples: int) -> dict[str, float]:
    """Samples/s of each role at one step (its ``perf/*`` timings)."""
    keys = {"rollout": "perf/rollout_s", "reward": "perf/reward_s", "learner": "perf/learner_s"}
    return {role: samples / row[k] if row.get(k, 0) > 0 else float("nan") for role, k in keys.items()}


def check_family(kind: str, root: Path, *, num_gpus: int, steps: int = 2, learners: int | None = None) -> FamilyCheck:
    """Build the tiny ``kind`` pipeline and reward under ``root``, train ``steps`` RL steps, probe, check."""
    ensure_ray()
    res = resources(num_gpus, learners)
    result = FamilyCheck(kind, "cuda" if num_gpus else "cpu", res["num_learners"], steps)
    save = getattr(tiny_models, f"save_tiny_{kind}")  # save_tiny_sd3, save_tiny_flux
    model, clip = save(root / f"{kind}-pipeline"), tiny_models.save_tiny_clip(root / "clip")
    cfg = load_config(write_config(kind, root, model=model, clip=clip, res=res, steps=steps))
    t0 = time.perf_counter()
    summary = run_training(cfg, progress=False, on_finish=lambda coord: result.probes.update(probe_actors(coord)))
    result.wall_s = time.perf_counter() - t0
    result.steps = [r for r in summary.history if "reward/mean" in r]
    if result.steps:
        result.rates = _rates(result.steps[-1], cfg.samples_per_step)
    result.problems = problems(result, steps_done=summary.after.get("train/steps_done"))
    return result


def problems(result: FamilyCheck, *, steps_done: float | None) -> list[str]:
    """The checks of one run that did not hold (see the module docstring)."""
    out = []
    if steps_done != result.steps_wanted or len(result.steps) != result.steps_wanted:
        out.append(f"{len(result.steps)} of {result.steps_wanted} steps logged (steps_done {steps_done})")
    for row in result.steps:
        bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            out.append(f"step {row.get('step')}: non-finite {bad}")
        if row.get("learner/updates", 0.0) < 1:
            out.append(f"step {row.get('step')}: no optimiser step (learner/updates {row.get('learner/updates')})")
        if "normguard/ratio_mean" not in row:
            out.append(f"step {row.get('step')}: no normguard/ratio_mean")
    want = {"learner rank", "sampler", "scorer"}
    missing = want - {name.rsplit(" ", 1)[0] for name in result.probes}
    out += [f"no report from any {role}" for role in sorted(missing)]
    for name, probe in result.probes.items():
        out += [f"{name}: {p}" for p in _probe_problems(name, probe, result.device)]
    return out


def _probe_problems(name: str, probe: ActorProbe, device: str) -> list[str]:
    """An actor's peak is > 0 and on the run's device; a model holder's LoRA is fp32, its frozen base bf16."""
    out = [] if probe.peak_mb > 0 else [f"peak memory {probe.peak_mb} MiB"]
    if (device == "cuda") != probe.on_cuda:
        out.append(f"reports {probe.device}, the run is on {device}")
    if name.startswith("scorer"):
        return out
    if not probe.trainable or any(not t.startswith(f"float32@{device}") for t in probe.trainable):
        out.append(f"trainable parameters {probe.trainable}, want float32@{device}")
    if not any(f.startswith(f"bfloat16@{device}") for f in probe.frozen) or any(device not in f for f in probe.frozen):
        out.append(f"frozen parameters {probe.frozen}, want a bfloat16 base on {device}")
    return out


def table(results: list[FamilyCheck]) -> str:
    """One row per actor of every run: its peaks and its role's samples/s at the last step."""
    role_rate = {"learner rank": "learner", "sampler": "rollout", "scorer": "reward"}
    rows = []
    for res in results:
        for name, p in res.probes.items():
            rows.append(
                {
                    "model": res.kind,
                    "actor": name,
                    "device": p.device,
                    "cuda_peak_alloc_MiB": p.peak_allocated_mb,
                    "cuda_peak_reserved_MiB": p.peak_reserved_mb,
                    "rss_peak_MiB": p.peak_rss_mb,
                    "samples_per_s": res.rates.get(role_rate[name.rsplit(" ", 1)[0]], float("nan")),
                    "trainable": ",".join(p.trainable) or "-",
                    "frozen": ",".join(p.frozen) or "-",
                }
            )
    return format_table(rows)


def _run_all(args, num_gpus: int, root: Path) -> list[FamilyCheck]:
    results = []
    for name in args.models:
        try:
            res = check_family(name, root / name, num_gpus=num_gpus, steps=args.steps, learners=args.learners)
        except Exception as err:  # noqa: BLE001 - reported, the other family still runs, the exit status says it
            traceback.print_exc()
            res = FamilyCheck(name, "cuda" if num_gpus else "cpu", 0, args.steps, problems=[f"run failed: {err!r}"])
        results.append(res)
        backend = "NCCL" if num_gpus else "gloo"
        print(
            f"{name}: {len(res.steps)}/{args.steps} steps in {res.wall_s:.1f} s on {res.device}, "
            f"{res.learners} learner worker(s) ({backend})",
            flush=True,
        )
    return results


def _gpus(device: str) -> int:
    """GPUs Ray can schedule (0 for the dry-run); ``--device cuda`` without one is an error."""
    import ray

    ensure_ray()
    found = int(ray.cluster_resources().get("GPU", 0))
    kinds = [k.removeprefix("accelerator_type:") for k in ray.cluster_resources() if k.startswith("accelerator_type:")]
    print(f"Ray sees {found} GPU(s) {kinds or ''}", flush=True)
    if device == "cuda" and found == 0:
        raise SystemExit("--device cuda: Ray sees no GPU")
    return 0 if device == "cpu" else found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--steps", type=int, default=2, help="RL steps per family")
    ap.add_argument("--models", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--learners", type=int, default=None, help="learner workers (default: 2 with >= 2 GPUs, else 1)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the models and runs here (default: a temp dir)")
    args = ap.parse_args()
    num_gpus = _gpus(args.device)
    with tempfile.TemporaryDirectory(prefix="ng-gpu-check-") as tmp:
        root = args.keep or Path(tmp)
        results = _run_all(args, num_gpus, root)
    print(table(results))
    failed = [f"{r.kind}: {p}" for r in results for p in r.problems]
    print("\n".join(["FAILED:", *failed]) if failed else "OK: every check held", flush=True)
    import ray

    ray.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
