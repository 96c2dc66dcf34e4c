"""Experiment trackers: TensorBoard, Weights & Biases and MLflow behind one small interface.

Where the field compares runs (flow_grpo, DiffusionNFT, Flow-Factory and verl-omni all log to
W&B; MLflow is the platform teams' default). ``logging.backends`` picks any subset; every backend
receives the same things:

* the config as run parameters (flattened dotted keys) at the start;
* every step's scalars (``metrics.jsonl`` keeps the complete record regardless);
* the image grids at every evaluation (``grids/<tag>_<N>steps``);
* the final summary.

Metric names are ``[A-Za-z0-9_./-]`` only (``report.eval_key``), legal in all three.

W&B runs offline by default (``logging.wandb_mode``; ``wandb sync <run_dir>/wandb/offline-run-*``
uploads later) and MLflow writes to ``sqlite:///<output_dir>/mlflow.db`` with artifacts under
``<output_dir>/mlartifacts`` unless ``logging.mlflow_tracking_uri`` names a server; neither needs a
network. A resumed run continues the same W&B run (its id is kept in the run directory) and the
same MLflow run. In a Tune sweep every trial is a training run and logs the same way, grouped by the
sweep's name (Tune's own ``WandbLoggerCallback`` / ``MLflowLoggerCallback`` see only the reported
scalars, not the grids, config or summary a run logs itself, so they are not used).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from services.config import LoggingConfig

__all__ = ["Tracker", "Trackers", "build_trackers", "flatten_config"]

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """What a backend implements."""

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_images(self, step: int, images: Mapping[str, Tensor]) -> None: ...

    def log_summary(self, summary: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become strings (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(list(value))
        else:
            out[name] = value
    return out


def _hwc_uint8(image: Tensor):
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 numpy."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


class TensorBoardTracker:
    def __init__(self, run_dir: Path, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), step)
        self.tb.flush()

    def log_images(self, step: int, images: Mapping[str, Tensor]) -> None:
        for name, img in images.items():
            self.tb.add_image(name, img.clamp(0, 1), step)
        self.tb.flush()

    def log_summary(self, summary: Mapping[str, float]) -> None:
        self.tb.add_text("summary", "\n".join(f"    {k}: {v:.6g}" for k, v in summary.items()), 0)

    def close(self) -> None:
        self.tb.close()


class WandbTracker:
    def __init__(
        self, run_dir: Path, params: Mapping[str, Any], *, project: str, name: str, group: str | None, mode: str
    ):
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=name,
            group=group,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=dict(params),
            reinit="create_new",
        )

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({k: float(v) for k, v in metrics.items()}, step=step)

    def log_images(self, step: int, images: Mapping[str, Tensor]) -> None:
        self.run.log({k: self.wandb.Image(_hwc_uint8(v)) for k, v in images.items()}, step=step)

    def log_summary(self, summary: Mapping[str, float]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = float(v)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(
        self, run_dir: Path, params: Mapping[str, Any], *, uri: str, artifacts: str, experiment: str, name: str
    ):
        import mlflow

        self.client = mlflow.tracking.MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, artifact_location=artifacts)
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            id_file.write_text(self.run_id)
            for key, value in params.items():  # params are write-once: only on a new run
                self.client.log_param(self.run_id, key, str(value)[:6000])

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_images(self, step: int, images: Mapping[str, Tensor]) -> None:
        for name, img in images.items():
            self.client.log_image(self.run_id, _hwc_uint8(img), f"{name}_step{step:06d}.png")

    def log_summary(self, summary: Mapping[str, float]) -> None:
        self.client.log_dict(self.run_id, {k: float(v) for k, v in summary.items()}, "summary.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """Fan-out to the configured backends; a failing backend is logged and dropped, never fatal."""

    def __init__(self, backends: list[Tracker]) -> None:
        self.backends = backends

    def _each(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception:  # noqa: BLE001 - a tracker outage must not kill a training run
                log.warning(
                    "tracker %s failed in %s; it is disabled for this run", type(b).__name__, method, exc_info=True
                )
                self.backends.remove(b)

    def log_scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self._each("log_scalars", step, metrics)

    def log_images(self, step: int, images: Mapping[str, Tensor]) -> None:
        self._each("log_images", step, images)

    def log_summary(self, summary: Mapping[str, float]) -> None:
        self._each("log_summary", summary)

    def close(self) -> None:
        self._each("close")


def build_trackers(
    logging_cfg: LoggingConfig, *, run_dir: Path, output_dir: Path, run_name: str, config: Mapping[str, Any]
) -> Trackers:
    """The backends of ``logging.backends`` for one run (unknown names fail at config load)."""
    params = flatten_config(config)
    backends: list[Tracker] = []
    for name in logging_cfg.backends:
        if name == "tensorboard":
            backends.append(TensorBoardTracker(run_dir, params))
        elif name == "wandb":
            backends.append(
                WandbTracker(
                    run_dir,
                    params,
                    project=logging_cfg.project,
                    name=run_name,
                    group=logging_cfg.group,
                    mode=logging_cfg.wandb_mode,
                )
            )
        elif name == "mlflow":
            uri = logging_cfg.mlflow_tracking_uri or f"sqlite:///{output_dir / 'mlflow.db'}"
            artifacts = (output_dir / "mlartifacts").as_uri()
            backends.append(
                MlflowTracker(
                    run_dir, params, uri=uri, artifacts=artifacts, experiment=logging_cfg.project, name=run_name
                )
            )
    return Trackers(backends)
