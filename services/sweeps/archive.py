"""A sweep's finished trials, cut to what its analysis reads, for committing beside the report.

A trial directory holds checkpoints, images and a per-step ``metrics.jsonl`` (about 38 MB for one
100-step colour trial). ``normguard compare``, ``services.sweeps.final_paired`` and ``services.sweeps.h3``
read only ``trial.json``, ``config.json``, ``summary.json`` and the evaluation rows of ``metrics.jsonl``
(:mod:`services.sweeps.trials`). This copies exactly those, so that the committed tables rebuild from
committed data, with the same commands, pointed at the archive:

    python -m services.sweeps.archive runs/sweeps/colour_pref --out docs/tasks/colour_sweep/colour_pref
    normguard compare docs/tasks/colour_sweep/colour_pref --steps 20

A trial without ``trial.json`` (not finished) is not copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

__all__ = ["archive_sweep"]

KEPT = ("trial.json", "config.json", "summary.json")


def _eval_rows(metrics: Path) -> str:
    rows = [line for line in metrics.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if any(k.startswith(("eval/", "eval_renorm/")) for k in json.loads(r))]
    return "".join(r + "\n" for r in keep)


def archive_sweep(sweep_dir: str | Path, out: str | Path) -> list[str]:
    """Copy every finished trial's analysed files under ``out/trials/``; returns the trial names."""
    src, dst = Path(sweep_dir) / "trials", Path(out) / "trials"
    names = []
    for trial in sorted(src.glob("*/trial.json")):
        d = dst / trial.parent.name
        d.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (trial.parent / name).exists():
                shutil.copyfile(trial.parent / name, d / name)
        (d / "metrics.jsonl").write_text(_eval_rows(trial.parent / "metrics.jsonl"))
        names.append(trial.parent.name)
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    names = archive_sweep(args.sweep_dir, args.out)
    print(f"archived {len(names)} finished trial(s) to {args.out}")


if __name__ == "__main__":
    main()
