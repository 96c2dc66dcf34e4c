"""``colour_pref``: a learned preference proxy with the bias of real human-preference reward models.

PickScore (Kirstain et al. 2023) and HPS are CLIP models fine-tuned on pairs of images for one prompt,
labelled by which one people preferred; the reward is the model's logit for the image. People prefer
prompt-correct images, and also more vivid ones, so the models learn both. RL against them
over-saturates and over-contrasts (the bias that CFG-rescale and the paper's renormalisation target;
issue #36). This proxy is trained the same way on the colour task, with that bias built into its data:

* **The model** (:class:`ColourPref`): a CLIP-style pair of encoders. A CNN image encoder (another
  width and seed than ``colour_clip``'s) gives a 64-d embedding that is **not** normalised; a
  bag-of-words text encoder gives a unit vector. The score is their inner product, a logit
  ``|f(x)| cos(f(x), t(p))``. PickScore's own logit is ``logit_scale * cos``, bounded by the
  temperature; here the image embedding's length is free, as a linear reward head on image features
  is (ImageReward, HPS v2's MLP), so nothing bounds the score and nothing normalises its scale away.
* **The preference pairs** (:func:`preference_pairs`), from real training scenes only (no RL sample):
  - *vividness*: one scene edited at two vividness levels ``a < b`` (:func:`vivid`: saturation about
    the pixel's luma and contrast about the image's mean luma, both scaled by ``1 + k a``); the more
    vivid one is preferred. Levels run from 0.5 below the data (duller) to ``VIVID_MAX`` above it, so
    the preferred image is often more saturated / contrasted than any real scene;
  - *prompt*: the prompt's own scene against another prompt's scene, each at an independent random
    vividness; the prompt-correct one is preferred whichever is more vivid.
* **The loss** is PickScore's: the softmax over the pair's two logits against the preference, i.e.
  Bradley-Terry ``-log sigmoid(s_w - s_l)``.

Trained in ``normguard prepare`` for the colour task (``services.prepare_colour``), cached under the
scorer directory (``pref-<steps>-<version>``, written once by ``services.models.cache.build_once``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.rewards.base import validate_images

__all__ = ["ColourPref", "PrefScorer", "build_colour_pref", "preference_pairs", "vivid"]

PREF_VERSION = "p1"
VIVID_MIN, VIVID_MAX = -0.5, 1.0  # vividness levels of the pairs: 0 = the real scene
SATURATION_GAIN, CONTRAST_GAIN = 1.5, 0.8  # level a scales saturation by 1 + 1.5 a, contrast by 1 + 0.8 a


def vivid(images: Tensor, level: Tensor) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] made more (``level > 0``) or less vivid, clamped to [0, 1].

    Saturation: each pixel's distance from its own luma scaled by ``1 + 1.5 level``; contrast: the
    distance from the image's mean luma scaled by ``1 + 0.8 level`` (``level`` is ``(B,)``).
    """
    lvl = level.to(images).view(-1, 1, 1, 1)
    luma = (0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]).expand_as(images)
    x = luma + (1 + SATURATION_GAIN * lvl).clamp_min(0) * (images - luma)
    mean = luma.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + (1 + CONTRAST_GAIN * lvl).clamp_min(0) * (x - mean)).clamp(0.0, 1.0)


class ColourPref(nn.Module):
    """Image ``(B, 3, 32, 32)`` in [-1, 1] and word ids ``(B, L)`` -> the ``(B,)`` preference logit."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        from services.rewards.colour_training import pair_encoders

        self.image, self.words, self.text = pair_encoders(24, dim)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        txt = F.normalize(self.text(self.words(ids)), dim=-1)
        return (self.image(x) * txt).sum(dim=-1)  # the image embedding keeps its length: an open logit


def preference_pairs(images: Tensor, labels: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(winners, losers, prompt_labels)`` in [0, 1]: a vividness pair and a prompt pair per scene.

    ``images`` ``(B, 3, H, W)`` in [0, 1] with attribute ``labels`` ``(B, 3)``; the prompt of both halves
    is the scene's own. A prompt pair's loser is another scene of the batch with a different prompt.
    """
    b = len(images)
    span = VIVID_MAX - VIVID_MIN
    lo, hi = (VIVID_MIN + span * torch.rand(2, b, generator=gen)).sort(dim=0).values
    perm = torch.randperm(b, generator=gen)
    other = torch.where((labels[perm] == labels).all(dim=1), torch.roll(perm, 1), perm)
    keep = ~(labels[other] == labels).all(dim=1)  # the rare scene whose two candidates share its prompt is dropped
    lw, ll = (VIVID_MIN + span * torch.rand(2, b, generator=gen)).unbind(0)
    winners = torch.cat([vivid(images, hi), vivid(images, lw)[keep]])
    losers = torch.cat([vivid(images, lo), vivid(images[other], ll)[keep]])
    return winners, losers, torch.cat([labels, labels[keep]])


def _ids(labels: Tensor) -> Tensor:
    from services.data.colour import colour_prompt
    from services.rewards.colour_training import tokenize

    return tokenize([colour_prompt(*map(int, row)) for row in labels])


@torch.no_grad()
def _held_out(model: ColourPref, x: Tensor, y: Tensor) -> dict[str, float]:
    """Pair accuracy on held-out scenes, and the mean logit of the real scenes edited along vividness."""
    w, lo, lab = preference_pairs(x, y, torch.Generator().manual_seed(7))
    ids = _ids(lab)
    right = (model(w * 2 - 1, ids) > model(lo * 2 - 1, ids)).float()
    out = {"pair_vivid": float(right[: len(x)].mean()), "pair_prompt": float(right[len(x) :].mean())}
    ids = _ids(y)
    for level in (-0.5, 0.0, 0.5, 1.0, 2.0):  # 2.0: twice as far beyond the data as any training pair
        out[f"logit_at_{level:+.1f}"] = float(model(vivid(x, torch.full((len(x),), level)) * 2 - 1, ids).mean())
    return out


def train_colour_pref(
    *, steps: int = 400, seed: int = 0, num_real: int = 8192, batch: int = 128, log: Callable[[str], None] = print
) -> tuple[ColourPref, dict[str, float]]:
    """Fit :class:`ColourPref` on the task's real training scenes (module docstring); held-out figures."""
    from services.data.colour import TEST_SEED, TRAIN_SEED, colour_dataset

    if steps < 1:  # the held-out figures report the last step's loss
        raise ValueError(f"colour_pref: steps must be >= 1, got {steps}")
    x, y = colour_dataset(num_real, TRAIN_SEED)
    x = (x + 1) / 2  # [-1, 1] -> [0, 1]: the edits act on images
    torch.manual_seed(seed + 3)
    model = ColourPref()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(1, steps), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed + 3)
    model.train()
    loss: Tensor | None = None
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        w, lo, lab = preference_pairs(x[idx], y[idx], gen)
        ids = _ids(lab)
        loss = -F.logsigmoid(model(w * 2 - 1, ids) - model(lo * 2 - 1, ids)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    assert loss is not None, "steps >= 1 (checked above)"
    xt, yt = colour_dataset(1024, TEST_SEED)
    stats = {"final_loss": float(loss.detach()), **_held_out(model, (xt + 1) / 2, yt)}
    log(f"colour_pref held-out: {stats}")
    return model, stats


def pref_dir(scorer_path: str | Path, steps: int) -> Path:
    return Path(scorer_path) / f"pref-{steps}-{PREF_VERSION}"


def build_colour_pref(
    scorer_path: str | Path, *, steps: int = 400, seed: int = 0, log: Callable[[str], None] = print
) -> Path:
    """Train and cache the preference proxy under ``scorer_path`` (once; ``build_once``)."""
    from services.models.cache import build_once

    def build(tmp: Path) -> dict:
        log(f"training the colour preference proxy ({steps} steps) ...")
        model, stats = train_colour_pref(steps=steps, seed=seed, log=log)
        torch.save(model.state_dict(), tmp / "pref.pt")
        return {"steps": steps, "seed": seed, "version": PREF_VERSION, "held_out": stats}

    return build_once(pref_dir(scorer_path, steps), build)


class PrefScorer:
    """The preference logit of ``colour_pref`` for ``(B, 3, H, W)`` images in [0, 1] and their prompts."""

    def __init__(self, model: ColourPref, *, name: str = "colour_pref", device: str | torch.device = "cpu") -> None:
        self.name, self.device = name, torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)

    def differentiable_score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from services.rewards.colour import _to_net
        from services.rewards.colour_training import tokenize

        return self.model(_to_net(images, self.device), tokenize(prompts).to(self.device)).float()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        with torch.no_grad():
            return self.differentiable_score(images, prompts).cpu()


def load_colour_pref(path: str | Path | None) -> ColourPref:
    """The cached model under a scorer directory (the one ``pref-*`` directory there)."""
    if path is None:
        raise ValueError("colour_pref: needs path= the colour scorer directory (written by prepare_colour)")
    found = sorted(Path(path).glob(f"pref-*-{PREF_VERSION}/pref.pt"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} (ambiguous)"
        raise FileNotFoundError(f"colour_pref: {what} pref-*-{PREF_VERSION}/pref.pt under {path}; run prepare first")
    meta = json.loads((found[0].parent / "meta.json").read_text())
    model = ColourPref()
    model.load_state_dict(torch.load(found[0], map_location="cpu", weights_only=True))
    model.meta = meta
    return model.eval().requires_grad_(False)


def _pref(path: str | None = None, device: str | torch.device = "cpu") -> PrefScorer:
    return PrefScorer(load_colour_pref(path), device=device)
