"""The GPU path end to end, ``benchmarks/gpu_check.py``'s check per family: tiny SD3 and FLUX trained 2 RL steps
through Ray with a bf16 base, the learner group on NCCL, samplers and the scorer on fractions of the GPU.

Skipped without CUDA (``tests/conftest.py`` skips every ``gpu`` item), so it costs CI nothing; the same code
path runs on CPU as ``python benchmarks/gpu_check.py --device cpu`` (gloo, RSS instead of CUDA memory).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmark_modules import load_benchmark  # noqa: E402


def _gpu_check():
    return load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def num_gpus():
    """GPUs Ray can schedule; a cluster this module started is shut down after it."""
    import ray

    from services.cluster.connect import ensure_ray

    started = not ray.is_initialized()
    ensure_ray()
    yield int(ray.cluster_resources().get("GPU", 0))
    if started:
        ray.shutdown()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_tiny_family_trains_on_cuda_with_a_bf16_base(num_gpus, tmp_path, kind):
    assert num_gpus >= 1, "CUDA is available but Ray sees no GPU"
    res = _gpu_check().check_family(kind, tmp_path, num_gpus=num_gpus, steps=2)
    assert res.problems == [], res.problems
    assert [r["step"] for r in res.steps] == [1, 2]
    assert all(r["learner/updates"] >= 1 and "normguard/ratio_mean" in r for r in res.steps)
    assert all(math.isfinite(v) for r in res.steps for v in r.values() if isinstance(v, float))
    learners = [p for name, p in res.probes.items() if name.startswith("learner rank")]
    assert len(learners) == res.learners == (2 if num_gpus >= 2 else 1)
    for p in learners:
        assert p.on_cuda and p.trainable and all(t.startswith("float32@cuda") for t in p.trainable), p
        assert any(f.startswith("bfloat16@cuda") for f in p.frozen) and all("@cuda" in f for f in p.frozen), p
    assert {n.rsplit(" ", 1)[0] for n in res.probes} == {"learner rank", "sampler", "scorer"}
    assert all(p.on_cuda and p.peak_allocated_mb > 0 and p.peak_reserved_mb > 0 for p in res.probes.values())
    assert all(v > 0 for v in res.rates.values()), res.rates
