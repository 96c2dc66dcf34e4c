"""``normguard`` command line: prepare, train, plan, submit, sweep, compare, analyze, serve, export, scorers.

Every command takes a YAML config (or none: the embedded default) plus ``key.path=value``
overrides, validated by the pydantic tree before anything starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.config import ExperimentConfig

    # what ``add_subparsers`` returns: typeshed's generic name (argparse exports no public one, and the
    # runtime class is not subscriptable, hence only here)
    _Commands = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["main"]


def _setup() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ray", "diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args: argparse.Namespace) -> ExperimentConfig:
    from services.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from services.config.families import spec
    from services.prepare import prepare_and_preview

    cfg = _load(args)
    if not spec(cfg.model.kind).embedded:
        print(
            f"`prepare` builds the embedded tasks (digits, colour); model.kind is {cfg.model.kind!r}", file=sys.stderr
        )
        return 2
    prepare_and_preview(cfg, args.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Exits 0, or 128 + the signal that stopped the run (143 SIGTERM, 130 SIGINT) after its checkpoint."""
    from services.training.preemption import StepAbandoned, exit_code
    from services.training.run import RunStopped, train_and_report

    try:
        print("\n" + train_and_report(_load(args), local=args.local))
    except RunStopped as stopped:
        again = shlex.join(["normguard", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else "the same command"
        print(f"normguard train: {stopped}; rerun {again} to resume", file=sys.stderr)
        return exit_code(stopped.state.request)
    except StepAbandoned as abandoned:  # a deadline that fired as the run was already ending
        print(f"normguard train: {abandoned}; rerun the same command to resume", file=sys.stderr)
        return exit_code(abandoned.request)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from services.cluster.submit import submit

    return submit(
        args.config, args.overrides, address=args.address, wait=args.wait, token=args.token, install=args.install
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run dir / checkpoint (as checkpoint 'trained') or a serve YAML; ``--host`` / ``--port``
    override the YAML's only when given."""
    from services.serving.app import serve_forever

    return serve_forever(args.target, host=args.host, port=args.port, num_cpus=args.num_cpus)


def cmd_sweep(args: argparse.Namespace) -> int:
    from services.sweeps.config import load_sweep
    from services.sweeps.tune import run_sweep, write_results

    sweep = load_sweep(args.config, args.overrides)
    if args.table_only:
        write_results(sweep)
        return 0
    run_sweep(sweep)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from services.analyze import adjoint_report

    adjoint_report(args.run_dir, steps=args.steps, samples=args.samples)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from services.sweeps.comparison import compare_and_report

    print(compare_and_report(args.sweep_dir, args.out, steps=args.steps))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from services.cluster.plan import plan_for

    try:
        text, ok = plan_for(_load(args), manifest=args.manifest, cluster=args.cluster)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(text)
    return 0 if ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from services.serving.export import export_run

    out = export_run(args.run_dir, args.out, step=args.step, overwrite=args.overwrite)
    print(f"exported {args.run_dir} to {out}:")
    for p in sorted(out.iterdir()):
        print(f"  {p.name}{'/' if p.is_dir() else ''}")
    return 0


def cmd_scorers(args: argparse.Namespace) -> int:
    from services.rewards import available_scorers

    print("\n".join(available_scorers()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normguard", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    _training_commands(sub)
    _sweep_commands(sub)
    _serving_commands(sub)
    sub.add_parser("scorers", help="list registered reward scorers").set_defaults(fn=cmd_scorers)
    return p


def _with_config(sub: _Commands, name: str, help_: str) -> argparse.ArgumentParser:
    sp = sub.add_parser(name, help=help_)
    sp.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded digits default)")
    sp.add_argument("overrides", nargs="*", help="key.path=value overrides")
    return sp


def _training_commands(sub: _Commands) -> None:
    sp = _with_config(sub, "prepare", "pretrain and cache the embedded generator and scorers; write preview grids")
    sp.add_argument("--out", default=None, help="directory for the preview PNGs")
    sp.set_defaults(fn=cmd_prepare)
    sp = _with_config(sub, "train", "run RL post-training (local Ray, or RAY_ADDRESS)")
    sp.add_argument("--local", action="store_true", help="run in one process without Ray (debugging, baseline)")
    sp.set_defaults(fn=cmd_train)
    sp = _with_config(sub, "submit", "submit `normguard train` to a Ray cluster with the Jobs SDK")
    sp.add_argument("--address", default=None, help="dashboard URL (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    sp.add_argument("--no-wait", dest="wait", action="store_false", help="return after submission")
    sp.add_argument("--token", default=None, help="cluster auth token (default: NORMGUARD_RAY_TOKEN / Ray's own)")
    sp.add_argument("--install", action="store_true", help="pip install the uploaded project on the cluster")
    sp.set_defaults(fn=cmd_submit)
    sp = _with_config(sub, "plan", "the run's actors, their CPU / GPU / memory, and whether a cluster can hold them")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--manifest", default=None, help="a KubeRay RayJob / RayCluster YAML (its nodes at maxReplicas)")
    where.add_argument("--cluster", default=None, help="a YAML cluster description: nodes: [{name, cpus, gpus, ...}]")
    sp.set_defaults(fn=cmd_plan)
    sp = sub.add_parser("analyze", help="adjoint sensitivity of reward to per-step velocity magnitude (digits runs)")
    sp.add_argument("run_dir")
    sp.add_argument("--steps", type=int, default=10)
    sp.add_argument("--samples", type=int, default=40)
    sp.set_defaults(fn=cmd_analyze)


def _sweep_commands(sub: _Commands) -> None:
    sp = sub.add_parser("sweep", help="run / resume an ablation sweep on Ray Tune; print its table")
    sp.add_argument("config", help="sweep YAML (deploy/sweeps/*.yaml)")
    sp.add_argument("overrides", nargs="*", help="key.path=value overrides of the sweep config")
    sp.add_argument("--table-only", action="store_true", help="only rebuild the table and plots")
    sp.set_defaults(fn=cmd_sweep)
    sp = sub.add_parser("compare", help="a sweep with arms and seeds: matched-reward table, paired tests, plots")
    sp.add_argument("sweep_dir", help="the sweep's directory (runs/sweeps/<name>)")
    sp.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR/comparison)")
    sp.add_argument("--steps", type=int, default=None, help="sampling steps of the evaluation (default: full)")
    sp.set_defaults(fn=cmd_compare)


def _serving_commands(sub: _Commands) -> None:
    sp = sub.add_parser("serve", help="serve a trained run / checkpoint or a serve YAML over HTTP (Ray Serve)")
    sp.add_argument(
        "target", nargs="?", default=None, help="run dir, checkpoint dir or serve YAML (default: base model)"
    )
    sp.add_argument("--host", default=None, help="override the serve YAML's host (default there: 127.0.0.1)")
    sp.add_argument("--port", type=int, default=None, help="override the serve YAML's port (default there: 8000)")
    sp.add_argument("--num-cpus", type=int, default=None)
    sp.set_defaults(fn=cmd_serve)
    sp = sub.add_parser(
        "export", help="a run as diffusers LoRA safetensors or a transformer/ folder, with a model card"
    )
    sp.add_argument("run_dir", help="the run directory (train.output_dir / train.run_name)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--step", type=int, default=None, help="the checkpoint of this RL step (default: the newest)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    sp.set_defaults(fn=cmd_export)


def main(argv: list[str] | None = None) -> int:
    _setup()
    parser = build_parser()
    # flags may come anywhere (`normguard train CONFIG --local key=value`): argparse stops filling the
    # override list at the first flag, so leftovers that look like overrides are appended to it
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    # `normguard train key=value` (no YAML): the first positional is an override, not a file
    has_config = args.command not in ("serve", "sweep", "analyze", "compare")
    if (
        has_config
        and getattr(args, "config", None)
        and "=" in args.config
        and not args.config.endswith((".yaml", ".yml"))
    ):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    from pydantic import ValidationError

    from services.checkpoints import CheckpointError
    from services.cluster.plan import ClusterTooSmall
    from services.config import ConfigError

    try:
        return args.fn(args)
    except (
        ValidationError,
        ConfigError,
        CheckpointError,
        ClusterTooSmall,
        FileNotFoundError,
        FileExistsError,
        KeyError,
    ) as err:  # a message
        print(f"normguard {args.command}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an unwritable or impossible train.output_dir
        print(f"normguard {args.command}: cannot use {err.filename}: {err.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
