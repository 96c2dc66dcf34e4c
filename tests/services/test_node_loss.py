"""Training through the loss of a whole node, on a Ray cluster of three nodes on this machine.

``ray.cluster_utils.Cluster``: the head (the driver, the scorer), worker node B (learner rank 0 or 1) and
worker node A (the two samplers and the other learner worker), placed by the run's custom resources
(``resources.{learner,sampler,scorer}_resources``, a node pool). Node A is removed (its processes
SIGKILLed) after step 3 twice:

1. with no node to take its place: the run stops after ``train.node_wait_s`` with :class:`NodeLost`
   naming node A, and a rerun, once a replacement node has joined, resumes from the step-2 checkpoint;
2. in that rerun, with a replacement joining at once: the run restarts itself (``train.max_failures``)
   and finishes.

Every step is in metrics.jsonl once, with the metrics and final evaluation of a run never interrupted.
The scenario runs in its own process (``python test_node_loss.py TMP_DIR OUT_JSON``): it starts and shuts down its own
cluster, apart from the session's local Ray (``ray_local``) that other tests in this process may hold.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

STEPS, KILL_AFTER = 4, 3  # checkpoints at steps 2 and 4: a loss after step 3 redoes steps 3 and 4
NODE_A = {"learner_slot": 1, "sampler_slot": 2}  # what the lost node and its replacements declare
INNER = {
    "train.steps": STEPS,
    "train.checkpoint_every": 2,
    "train.node_wait_s": 10,
    "resources.num_learners": 2,
    "resources.learner_cpus": 0.5,
    "resources.learner_resources": "{learner_slot: 1}",  # one learner per node: one on A, one on B
    "resources.sampler_resources": "{sampler_slot: 1}",  # both samplers on A
    "resources.scorer_resources": "{head_slot: 1}",  # the scorer on the head
}
KEYS = ("reward/mean", "loss/total", "normguard/ratio_mean", "learner/updates")
SCENARIO_TIMEOUT_S = 900


@pytest.mark.unit
def test_custom_resources_place_the_actors_and_only_custom_keys_are_taken():
    from pydantic import ValidationError

    from services.config import load_config
    from services.training.nodes import NodeInfo, run_demands, unplaced

    cfg = load_config(None, [f"{k}={v}" for k, v in INNER.items()])
    demands = dict(run_demands(cfg))
    assert demands["learner #1"] == {"CPU": 0.5, "learner_slot": 1.0}
    assert demands["sampler #0"] == {"CPU": 0.25, "sampler_slot": 1.0} and "sampler #1" in demands
    assert demands["scorer #0"] == {"CPU": 0.25, "head_slot": 1.0}
    head = NodeInfo("h", "10.0.0.1", 1, {"CPU": 1.0, "head_slot": 1.0})
    b = NodeInfo("b", "10.0.0.2", 1, {"CPU": 1.0, "learner_slot": 1.0})
    a = NodeInfo("a", "10.0.0.3", 1, {"CPU": 1.0, **NODE_A})
    assert unplaced(list(demands.items()), [head, b, a]) == []
    missing = unplaced(list(demands.items()), [head, b])  # node A lost
    assert sorted(m.split(" {")[0] for m in missing) == ["learner #1", "sampler #0", "sampler #1"]
    for bad in ("{GPU: 1}", "{learner_slot: -1}"):
        with pytest.raises(ValidationError, match="learner_resources"):
            load_config(None, [f"resources.learner_resources={bad}"])


@pytest.mark.unit
def test_a_lost_node_is_reported_once_and_a_run_it_cannot_hold_stops_naming_it(tmp_path, monkeypatch):
    import services.training.nodes as nodes
    from services.config import load_config

    head = nodes.NodeInfo("head-id", "10.0.0.1", 1, {"CPU": 1.0, "head_slot": 1.0})
    b = nodes.NodeInfo("b-id", "10.0.0.2", 1, {"CPU": 1.0, "learner_slot": 1.0})
    a = nodes.NodeInfo("a-id", "10.0.0.3", 1, {"CPU": 1.0, **NODE_A})
    cluster = {n.node_id: n for n in (head, b, a)}
    monkeypatch.setattr(nodes, "alive_nodes", lambda probe=False: dict(cluster))
    watch = nodes.NodeWatch()
    watch.attempt_started()
    assert watch.newly_lost() == []
    del cluster["a-id"]
    assert watch.newly_lost() == [a] and watch.newly_lost() == []  # the next error is judged on its own
    cfg = load_config(None, [f"{k}={v}" for k, v in {**INNER, "train.output_dir": tmp_path}.items()])
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    (cfg.run_dir / "checkpoints" / "latest").write_text("step_000002")
    with pytest.raises(nodes.NodeLost, match=r"lost node\(s\) a-id \(10\.0\.0\.3\).*sampler #0.*step_000002"):
        nodes.wait_for_placement(cfg, watch, timeout_s=0)
    cluster["a2-id"] = nodes.NodeInfo("a2-id", "10.0.0.4", 1, {"CPU": 1.0, **NODE_A})  # a replacement joined
    nodes.wait_for_placement(cfg, watch, timeout_s=0)


@pytest.mark.unit
def test_the_failure_policy_restarts_a_lost_learner_or_node_and_raises_the_rest():
    from services.training.failure import FailureDecision, FailurePolicy
    from services.training.learner_group import LearnerLost, _no_restarts_by_ray_train
    from services.training.remote import Unrecoverable, until_answered

    policy = FailurePolicy(max_failures=1)
    assert policy.decide(LearnerLost("x"), 0) is FailureDecision.RESTART
    assert policy.decide(ValueError("a sampler that cannot restart"), 0, nodes_lost=1) is FailureDecision.RESTART
    assert policy.decide(ValueError("a bug"), 0) is FailureDecision.RAISE
    assert policy.decide(LearnerLost("x"), 1) is FailureDecision.RAISE  # max_failures spent
    calls = []

    def lost():
        calls.append(1)
        raise LearnerLost("gone")

    with pytest.raises(Unrecoverable):  # not retried until the timeout: the failure policy decides at once
        until_answered(lost, timeout_s=60)
    assert calls == [1]
    fc = _no_restarts_by_ray_train()  # Ray Train rebuilds nothing behind the driver's back
    assert fc.max_failures == 0 and getattr(fc, "max_preemption_failures", 0) == 0


@pytest.mark.service
def test_weights_lost_with_the_learner_worker_that_put_them_are_a_lost_learner(ray_local):
    """Rank 0 puts the policy weights it ships, so it owns them: when its node goes, a sampler re-sync with
    them fails with OwnerDiedError, which is the learner's loss (restarted), not a sampler error."""
    import torch
    from ray.exceptions import OwnerDiedError

    from services.training.remote import LearnerLost, call

    @ray_local.remote(num_cpus=0)
    class Owner:
        def put(self):
            return [ray_local.put(torch.zeros(200_000))]  # out of band: the object store, owned by this actor

    @ray_local.remote(num_cpus=0)
    class Sampler:
        def set_weights(self, weights, version):
            return version

    owner, sampler = Owner.remote(), Sampler.remote()
    (ref,) = ray_local.get(owner.put.remote(), timeout=60)
    ray_local.kill(owner)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until Ray has dropped the dead owner's object
        try:
            ray_local.get(ref, timeout=10)
            time.sleep(0.5)
        except OwnerDiedError:
            break
    with pytest.raises(LearnerLost, match="owned by a learner worker"):
        call(sampler, "set_weights", ref, 1, timeout_s=60)
    ray_local.kill(sampler)


@pytest.mark.service
def test_a_build_that_fails_half_way_kills_the_actors_it_started(ray_local, digits_assets, tmp_path, monkeypatch):
    """The learner group cannot start (its node pool is gone): the sampler and scorer actors created before
    it are killed, not left pending to take a rerun's resources when a node joins."""
    import ray._private.state as ray_state
    from conftest import tiny_overrides

    import services.training.learner_group as lg
    from services.config import load_config
    from services.training.build import build_coordinator

    def actors() -> dict[str, str]:
        kinds = ("RolloutSampler", "ScorerWorker")
        return {i: a["State"] for i, a in ray_state.actors().items() if a["ActorClassName"] in kinds}

    def no_placement(self, *args, **kwargs):
        raise lg.LearnerLost("the worker group startup timed out")

    before = actors()
    monkeypatch.setattr(lg.LearnerGroup, "__init__", no_placement)
    with pytest.raises(lg.LearnerLost) as failed:  # kept, as a run's error chain keeps it: its frames hold the handles
        build_coordinator(load_config(None, tiny_overrides(tmp_path, "half")))
    deadline, new = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        new = {i: st for i, st in actors().items() if i not in before}
        if len(new) == 3 and all(st == "DEAD" for st in new.values()):  # 2 samplers, 1 scorer
            break
        time.sleep(0.5)
    assert len(new) == 3 and set(new.values()) == {"DEAD"}, (new, failed.value)


@pytest.mark.service
@pytest.mark.slow
def test_a_lost_node_is_survived_or_named_and_the_run_equals_the_calm_one(digits_assets, tmp_path):
    out = tmp_path / "scenario.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the cluster's processes go with the group if the scenario overruns
    )
    try:
        log, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the node-loss scenario ran over {SCENARIO_TIMEOUT_S} s:\n{log[-5000:]}")
    assert proc.returncode == 0 and out.is_file(), log[-5000:]
    res = json.loads(out.read_text())

    # 1. no replacement: stopped, naming the lost node, with every step made so far kept once
    assert res["stopped"]["type"] == "NodeLost", res["stopped"]
    assert res["lost_first"]["node_id"] in res["stopped"]["message"]
    assert "train.node_wait_s" in res["stopped"]["message"] and "step_000002" in res["stopped"]["message"]
    # 2. the rerun resumed from step 2 and survived the second loss itself
    calm, rows = res["calm"], res["lost"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in KEYS} for r in rows] == [{k: r[k] for k in KEYS} for r in calm]
    assert res["lost_after"] == res["calm_after"]
    assert [r["faults/learner_restarts"] for r in rows] == [0, 0, 1, 0]  # step 3 redone after the restart
    assert rows[-1]["faults_total/learner_restarts"] == 1
    assert any(res["lost_second"]["node_id"] in line for line in res["restart_log"])  # the restart names it
    print(f"node-loss scenario: {res['seconds']:.0f} s")


# ---- the scenario, in its own process ---------------------------------------------------------------
def _scenario(tmp: Path, out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_slot": 1}, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1, resources={"learner_slot": 1})  # node B
        node_a = cluster.add_node(num_cpus=1, resources=NODE_A)
        env = {k: os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "NORMGUARD_CACHE")}
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
        restarts = _Capture()
        logging.getLogger("services.training.controller").addHandler(restarts)
        res = _runs(tmp, cluster, node_a, restarts)
        res["seconds"] = time.monotonic() - t0
        out.write_text(json.dumps(res))
    finally:
        ray.shutdown()
        cluster.shutdown()


def _runs(tmp: Path, cluster, node_a, restarts) -> dict:
    from conftest import tiny_overrides

    from services.config import load_config
    from services.training.run import run_training

    def train(name: str, on_step=None):
        return run_training(load_config(None, tiny_overrides(tmp, name, **INNER)), progress=False, on_step=on_step)

    calm = train("calm")
    res = {"calm": _rows(calm.history), "calm_after": calm.after}
    # 1. node A lost after step 3, nothing joins: the run stops
    res["lost_first"], err = _lose_node(cluster, node_a, lambda hook: train("lost", hook), replace=False)
    res["stopped"] = {"type": type(err).__name__, "message": str(err)}
    del err  # its traceback holds the stopped run's objects
    # 2. a replacement joins, the rerun resumes; its node lost after step 3 again, replaced at once
    node = cluster.add_node(num_cpus=1, resources=NODE_A)
    logging.info("scenario: added node %s", node.node_id)
    res["lost_second"], summary = _lose_node(cluster, node, lambda hook: train("lost", hook), replace=True)
    res["lost"], res["lost_after"] = _rows(summary.history), summary.after
    res["restart_log"] = restarts.lines
    return res


def _lose_node(cluster, node, run, *, replace: bool):
    """Run training in a thread; after step ``KILL_AFTER`` (the training thread waits) remove ``node`` and,
    with ``replace``, add one with the same resources (Ray starts nodes from the main thread only).
    Returns ``({node_id, address}, what the run returned or raised)``."""
    asked, removed, result = threading.Event(), threading.Event(), {}

    def hook(step, _metrics):
        if step == KILL_AFTER and not asked.is_set():
            result["queues_on_driver_node"] = _queues_on_driver_node()
            asked.set()
            assert removed.wait(timeout=120), "the node was not removed"

    def target():
        try:
            result["value"] = run(hook)
        except Exception as err:  # noqa: BLE001 - the first loss is expected to stop the run
            result["value"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while not asked.wait(timeout=1.0):
        if not thread.is_alive():
            raise RuntimeError(f"the run ended before step {KILL_AFTER}: {result.get('value')!r}")
    lost = {"node_id": node.node_id, "address": node.node_ip_address}
    cluster.remove_node(node, allow_graceful=False)  # SIGKILL: a node that vanishes, not one drained
    logging.info("scenario: removed node %s", node.node_id)
    if replace:
        logging.info("scenario: added node %s", cluster.add_node(num_cpus=1, resources=NODE_A).node_id)
    removed.set()
    thread.join(timeout=SCENARIO_TIMEOUT_S)
    if thread.is_alive():
        raise RuntimeError("the run did not end after the node loss")
    assert result["queues_on_driver_node"], "a learner command queue is not on the driver's node"
    return lost, result["value"]


def _queues_on_driver_node() -> bool:
    """The learner group's command and reply queues live on the driver's node (a queue on the lost node
    would end the run instead of a restart)."""
    import ray
    import ray._private.state as ray_state

    here = ray.get_runtime_context().get_node_id()
    queues = [a for a in ray_state.actors().values() if a["ActorClassName"] == "_QueueActor" and a["State"] == "ALIVE"]
    return len(queues) >= INNER["resources.num_learners"] + 1 and all(q["Address"]["NodeID"] == here for q in queues)


def _rows(history: list[dict]) -> list[dict]:
    return [
        {"step": r["step"], **{k: v for k, v in r.items() if k in KEYS or k.startswith("faults")}}
        for r in history
        if "reward/mean" in r
    ]


class _Capture(logging.Handler):
    """Keeps the run's restart warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "restart" in record.getMessage():
            self.lines.append(record.getMessage())


if __name__ == "__main__":
    _scenario(Path(sys.argv[1]), Path(sys.argv[2]))
