"""Trackers: a 2-step run logged to TensorBoard, offline W&B and a local MLflow store, read back."""

from __future__ import annotations

import json
import re
import struct

import pytest
from conftest import tiny_overrides

from services.config import load_config
from services.training.run import run_training

pytestmark = pytest.mark.service

LEGAL = re.compile(r"^[A-Za-z0-9_./-]+$")  # TensorBoard summary names and MLflow keys


def _wandb_records(path):
    """The history / summary records of an offline ``.wandb`` file (LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []  # 7-byte ":W&B" header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_run_logs_to_wandb_offline_and_mlflow_and_reads_back(digits_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    over = tiny_overrides(tmp_path, "tracked", **{"train.eval_every": 1, "logging.project": "ng-test"})
    cfg = load_config(None, [*over, "logging.backends=[tensorboard, wandb, mlflow]"])
    summary = run_training(cfg, local=True, progress=False)
    run_dir = cfg.run_dir

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r}
    assert "eval/frechet_6steps" in keys and all(LEGAL.match(k) for k in keys), sorted(keys)
    rewards = {r["step"]: r["reward/mean"] for r in records if "reward/mean" in r}

    # W&B, offline: the step scalars, an image grid, the config and the summary
    (wb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    recs = _wandb_records(wb_file)
    history = [
        {(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item} for r in recs if r.HasField("history")
    ]
    logged = {int(h["_step"]): float(h["reward/mean"]) for h in history if "reward/mean" in h}
    assert logged == pytest.approx(rewards)
    assert any(any(k.startswith("grids/eval_6steps") for k in h) for h in history)
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/grids/*.png"))
    config = [u for r in recs if r.HasField("run") for u in r.run.config.update]
    assert any(u.key == "loss.name" and json.loads(u.value_json) == "diffusion_nft" for u in config)
    summ = {u.key: u.value_json for r in recs if r.HasField("summary") for u in r.summary.update}
    assert float(summ["eval/frechet_6steps"]) == pytest.approx(summary.after["eval/frechet_6steps"])

    # MLflow, local sqlite store: scalars per step, params, an image artifact, the summary
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    hist = {m.step: m.value for m in client.get_metric_history(run_id, "reward/mean")}
    assert hist == pytest.approx(rewards)
    assert client.get_run(run_id).data.params["loss.name"] == "diffusion_nft"
    arts = [a.path for a in client.list_artifacts(run_id, "grids")]
    assert any(p.startswith("grids/after_6steps") and p.endswith(".png") for p in arts), arts
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read())["eval/frechet_6steps"] == pytest.approx(summary.after["eval/frechet_6steps"])

    # TensorBoard: the event file holds the same scalar under the same (legal) name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert "eval/frechet_6steps" in acc.Tags()["scalars"] and acc.Tags()["images"]


def test_unknown_backend_fails_at_load():
    with pytest.raises(ValueError, match="backends"):
        load_config(None, ["logging.backends=[neptune]"])
