"""``colour_pref``: the vividness edit, the preference pairs, and a tiny model that trains, caches and scores."""

import torch

from services.data.colour import colour_dataset
from services.rewards.colour import colour_stats
from services.rewards.colour_pref import ColourPref, PrefScorer, build_colour_pref, preference_pairs, vivid


def _scenes(n=16):
    x, y = colour_dataset(n, seed=5)
    return (x + 1) / 2, y


def test_vivid_is_the_identity_at_zero_and_raises_saturation_and_contrast():
    x, _ = _scenes(8)
    assert torch.allclose(vivid(x, torch.zeros(8)), x, atol=1e-6)
    stats = [colour_stats(vivid(x, torch.full((8,), lvl))) for lvl in (-0.5, 0.0, 1.0)]
    for key in ("saturation", "contrast"):
        dull, real, bright = (s[key].mean() for s in stats)
        assert dull < real < bright, key


def test_pairs_prefer_the_more_vivid_scene_and_the_prompts_own_scene():
    x, y = _scenes(32)
    w, lo, lab = preference_pairs(x, y, torch.Generator().manual_seed(0))
    n = len(x)
    assert w.shape == lo.shape and len(lab) == len(w) and n < len(w) <= 2 * n
    assert torch.equal(lab[:n], y)
    sat = lambda im: colour_stats(im)["saturation"]  # noqa: E731
    assert bool((sat(w[:n]) >= sat(lo[:n]) - 1e-6).all())  # the vividness half: winner at the higher level
    assert 0.0 <= float(w.min()) and float(w.max()) <= 1.0


def test_the_logit_is_not_normalised_away():
    torch.manual_seed(0)
    model = ColourPref().eval()
    x, y = _scenes(4)
    from services.rewards.colour_pref import _ids

    ids = _ids(y)
    s = model(x * 2 - 1, ids)
    last = model.image[-1]
    with torch.no_grad():
        last.weight.mul_(3.0)
        last.bias.mul_(3.0)
    assert torch.allclose(model(x * 2 - 1, ids), 3.0 * s, atol=1e-5)  # the image embedding's length is the scale


def test_trains_caches_once_and_scores_with_gradients(tmp_path, monkeypatch):
    import services.rewards.colour_pref as cp

    torch.set_num_threads(2)
    calls = []
    real = cp.train_colour_pref
    monkeypatch.setattr(cp, "train_colour_pref", lambda **kw: calls.append(kw) or real(**{**kw, "num_real": 64}))
    path = build_colour_pref(tmp_path, steps=3, log=lambda s: None)
    assert (path / "pref.pt").is_file() and (path / "meta.json").is_file()
    assert build_colour_pref(tmp_path, steps=3, log=lambda s: None) == path and len(calls) == 1  # cached
    from services.rewards import build_scorer

    scorer = build_scorer("colour_pref", path=str(tmp_path))
    assert isinstance(scorer, PrefScorer)
    x, y = _scenes(3)
    from services.data.colour import colour_prompt

    prompts = [colour_prompt(*map(int, r)) for r in y]
    s = scorer.score(x, prompts)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    img = x.clone().requires_grad_(True)
    scorer.differentiable_score(img, prompts).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
