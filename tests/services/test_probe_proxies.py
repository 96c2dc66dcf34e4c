"""The proxy probe: fixed-length ascent steps, the radial cosine, the ES estimate, and a tiny end-to-end run."""

import pytest
import torch

from services.probe_proxies import ProbeConfig, _es_gradient, ascend


def _none(z):
    return {}


def test_a_radial_proxy_grows_the_norm_by_the_step_length_each_step():
    z0 = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    rows = ascend(z0, lambda z: z.flatten(1).pow(2).sum(1), _none, ProbeConfig(steps=3, step_size=0.1))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["norm_ratio"] for r in rows] == pytest.approx([1.0, 1.1, 1.2, 1.3], abs=1e-5)
    assert all(r["cos_grad_z"] == pytest.approx(1.0, abs=1e-5) for r in rows)


def test_a_norm_free_proxy_climbs_without_a_radial_direction():
    z0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    # the direction of z only (a cosine to a fixed vector): its gradient is orthogonal to z
    target = torch.randn(16, generator=torch.Generator().manual_seed(2))

    def cosine(z):
        return (z @ target) / z.norm(dim=1) / target.norm()

    rows = ascend(z0, cosine, _none, ProbeConfig(steps=4, step_size=0.05))
    assert all(abs(r["cos_grad_z"]) < 1e-5 for r in rows)
    assert rows[-1]["proxy"] > rows[0]["proxy"]
    assert rows[-1]["norm_ratio"] == pytest.approx(1.0, abs=0.02)  # tangent steps: second order only


def test_es_gradient_points_along_the_true_gradient():
    z = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    w = torch.randn(10, generator=torch.Generator().manual_seed(4))
    g = _es_gradient(lambda x: x @ w, z, pairs=400, sigma=0.1, seed=0)
    cos = torch.nn.functional.cosine_similarity(g, w.expand_as(g), dim=1)
    assert bool((cos > 0.9).all())


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    from services.prepare_colour import prepare_colour

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("probe")
    return prepare_colour(vae_steps=2, pretrain_steps=2, scorer_steps=2, num_fake=8, cache_dir=root, log=lambda s: None)


def test_the_probe_runs_on_tiny_colour_assets(tiny_assets, monkeypatch, capsys):
    import services.prepare as prep
    from services.probe_proxies import main

    monkeypatch.setattr(prep, "prepare_task", lambda m, **kw: tiny_assets)
    main(["deploy/configs/colour_nft.yaml", "--samples", "3", "--steps", "2", "--es-pairs", "2", "--print-every", "1"])
    out = capsys.readouterr().out
    for name in ("**colour_clip**", "**colour_pref**", "**colour_jpeg (ES gradient)**"):
        assert name in out
    assert out.count("| 2 | ") == 3  # the last step of each proxy's table


def test_base_spread_evaluates_like_a_run_at_several_seeds(tiny_assets, monkeypatch, capsys):
    import services.prepare as prep
    from services.base_spread import main

    monkeypatch.setattr(prep, "prepare_task", lambda m, **kw: tiny_assets)
    small = ["eval.num_prompts=2", "eval.samples_per_prompt=2", "eval.few_steps=1", "eval.full_steps=2"]
    main(["deploy/configs/colour_nft.yaml", *small, "--seeds", "2", "--extra", "colour_pref"])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| eval/")}
    for key in (
        "eval/colour_clip_2steps",
        "eval/colour_pref_1steps",
        "eval/frechet_2steps",
        "eval/colour_saturation_2steps",
    ):
        assert key in rows, key
        assert len(rows[key].rstrip(" |").split(" | ")[-1].split(", ")) == 2  # one value per seed
