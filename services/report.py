"""Run-directory outputs: metrics.jsonl, TensorBoard events, plots, image grids, tables."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["MetricsWriter", "eval_key", "format_table", "grid_tensor", "save_image_grid", "split_eval_key"]

_EVAL_KEY = re.compile(r"^(?P<name>.+)_(?P<steps>\d+)steps$")


def eval_key(name: str, steps: int, *, prefix: str = "eval") -> str:
    """``eval/{name}_{steps}steps``: the one spelling of an evaluation metric.

    Only letters, digits, ``_``, ``-``, ``.`` and ``/``: legal as a TensorBoard summary name, an
    MLflow metric key and a W&B key alike (``@`` is illegal in the first two).
    """
    return f"{prefix}/{name}_{steps}steps"


def split_eval_key(key: str) -> tuple[str, int] | None:
    """``"eval/frechet_20steps"`` -> ``("eval/frechet", 20)``; ``None`` for other keys."""
    m = _EVAL_KEY.match(key)
    return (m["name"], int(m["steps"])) if m else None


def save_image_grid(
    images: Tensor, path: str | Path, *, nrow: int, scale: int = 4, row_labels: Sequence[str] | None = None
) -> Path:
    """Save ``(N, 3, H, W)`` images in [0, 1] as a PNG grid (:func:`grid_tensor`, optional row labels)."""
    from PIL import Image, ImageDraw

    grid = grid_tensor(images, nrow=nrow, scale=scale)  # (3, H', W')
    label_w = 0 if not row_labels else 8 * max(len(s) for s in row_labels) + 6
    canvas = Image.new("RGB", (label_w + grid.shape[2], grid.shape[1]), "white")
    canvas.paste(Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).cpu().numpy()), (label_w, 0))
    if row_labels:
        draw = ImageDraw.Draw(canvas)
        tile_h, pad = images.shape[-2] * scale, 2
        for r, text in enumerate(row_labels[: math.ceil(images.shape[0] / nrow)]):
            draw.text((3, pad + r * (tile_h + pad) + tile_h // 2 - 5), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def grid_tensor(images: Tensor, *, nrow: int, pad: int = 2, scale: int | None = None) -> Tensor:
    """``(N, 3, H, W)`` in [0, 1] -> one ``(3, H', W')`` grid on white, each image upscaled ``scale``
    times (nearest; default: small images to >= 64 px). Videos ``(N, F, 3, H, W)``: each video's frames side
    by side, ``nrow`` videos a row."""
    if images.ndim == 5:
        nrow, images = nrow * images.shape[1], images.flatten(0, 1)
    scale = scale or max(1, 64 // images.shape[-1])
    images = images.float().clamp(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    out = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            images[i]
        )
    return out


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table of dict rows (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


class Trackers(Protocol):
    """Where the metrics are mirrored (``services.training.trackers.Trackers``: TensorBoard / W&B / MLflow)."""

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_images(self, step: int, images: Mapping[str, Tensor]) -> None: ...

    def log_summary(self, summary: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class MetricsWriter:
    """Append-only metrics.jsonl in a run directory, mirrored to the run's trackers."""

    def __init__(self, run_dir: str | Path, trackers: Trackers | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.trackers = trackers  # services.training.trackers.Trackers: TensorBoard / W&B / MLflow

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (a resumed run rewrites them)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log_scalars(step, {k: v for k, v in record.items() if k != "step"})

    def read(self) -> list[dict]:
        """All records."""
        return self.read_file(self.run_dir)

    @staticmethod
    def read_file(run_dir: str | Path) -> list[dict]:
        """All records of a run directory's metrics.jsonl, without opening a writer."""
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


def plot_training(
    records: Sequence[Mapping[str, float]],
    path: str | Path,
    keys: Sequence[str] = ("reward/mean", "normguard/ratio_mean", "loss/total"),
) -> Path | None:
    """Plot metric curves vs training step (one panel per key present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    axes = [axes] if len(keys) == 1 else axes
    for ax, k in zip(axes, keys):
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(k)
        ax.set_xlabel("training step")
        if k.startswith("normguard/ratio"):
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_ratio_per_step(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str) -> Path:
    """Velocity-norm ratio ||v|| / ||v_ref|| per sampling step, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(curves) > 4
    fig, ax = plt.subplots(figsize=(9 if many else 5, 3.6 if many else 3.2))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("sampling step (sigma: 1 -> 0)")
    ax.set_ylabel("||v|| / ||v_ref||")
    ax.set_title(title)
    if many:  # keep the legend off the curves
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    else:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
