"""The colour task's learned scorers: their networks and their training (never on RL samples).

* :class:`ColourCLIP` - the reward proxy, CLIP-style: a CNN image encoder (ReLU, max-pooling) and a
  bag-of-words text encoder over the prompt's words (``nn.EmbeddingBag`` + MLP), both projected to 64
  dimensions and L2-normalised, with CLIP's learned temperature (``logit_scale``, initialised to
  ``log(1 / 0.07)`` and clamped at ``log(100)``, Radford et al. 2021). It is trained contrastively on
  the task's real training images and their prompts only, as CLIP / PickScore never saw RL samples.
  The loss is CLIP's symmetric InfoNCE with one change: the task has only 96 distinct prompts, so a
  batch of 256 holds several pairs per prompt, and every pair with the same prompt is a positive (the
  target distribution of a row is uniform over them) instead of a false negative.
* :class:`ColourJudge` - the independent judge: another architecture (strided 5x5 / 3x3 convolutions,
  GroupNorm, GELU, average pooling) and another seed, three heads (shape, colour, background) trained
  with cross-entropy on real images; its 128-d penultimate features feed the set-level metrics.
* :class:`RealismCNN` - real vs. generated: real training images vs. base-model samples.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.data.colour import BACKGROUNDS, COLOURS, SHAPES, all_prompts, colour_dataset, colour_prompt

__all__ = ["ColourCLIP", "ColourJudge", "RealismCNN", "train_colour_scorers"]

LOGIT_SCALE_MAX = 100.0
HEADS = (len(SHAPES), len(COLOURS), len(BACKGROUNDS))
VOCAB = tuple(sorted({w for p in all_prompts() for w in p.split()} | {"an"}))


def tokenize(prompts: Sequence[str]) -> Tensor:
    """``(B, L)`` word ids of equal-length prompts (every task prompt has 8 words)."""
    ids = []
    for p in prompts:
        words = p.lower().split()
        unknown = [w for w in words if w not in VOCAB]
        if unknown or not words:
            raise ValueError(f"colour_clip: prompt {p!r} has words outside the task's vocabulary {VOCAB}: {unknown}")
        ids.append([VOCAB.index(w) for w in words])
    if len({len(i) for i in ids}) > 1:
        raise ValueError("colour_clip: prompts of a batch must have the same number of words")
    return torch.tensor(ids, dtype=torch.long)


def pair_encoders(width: int, dim: int) -> tuple[nn.Sequential, nn.EmbeddingBag, nn.Sequential]:
    """The image tower (three conv blocks of ``width``, ``2 width``, ``4 width`` channels on 32 x 32, then an MLP
    to ``dim``), the bag of words and the text MLP that the colour task's CLIP-style models share (their state
    dict keys: ``image.*``, ``words.*``, ``text.*``)."""
    w = (width, 2 * width, 4 * width)
    image = nn.Sequential(
        nn.Conv2d(3, w[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w[0], w[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w[1], w[2], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(w[2] * 16, 2 * w[2]), nn.ReLU(), nn.Linear(2 * w[2], dim),
    )  # fmt: skip
    words = nn.EmbeddingBag(len(VOCAB), 64, mode="mean")
    return image, words, nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, dim))


class ColourCLIP(nn.Module):
    """Image ``(B, 3, 32, 32)`` in [-1, 1] and word ids ``(B, L)`` -> normalised ``(B, 64)`` embeddings."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.image, self.words, self.text = pair_encoders(32, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        return F.normalize(self.text(self.words(ids)), dim=-1)

    def scale(self) -> Tensor:
        """CLIP's temperature ``exp(logit_scale)``, clamped at 100."""
        return self.logit_scale.clamp(max=math.log(LOGIT_SCALE_MAX)).exp()


class ColourJudge(nn.Module):
    """Three-head attribute classifier; ``features`` is its 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 5, stride=2, padding=2), nn.GroupNorm(4, 24), nn.GELU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.GroupNorm(4, 48), nn.GELU(),
            nn.Conv2d(48, 96, 3, stride=2, padding=1), nn.GroupNorm(4, 96), nn.GELU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(384, 128), nn.GELU(),
        )  # fmt: skip
        self.head = nn.Linear(128, sum(HEADS))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits per head: ``[(B, 4), (B, 6), (B, 4)]``."""
        return list(self.head(self.features(x)).split(HEADS, dim=1))


class RealismCNN(nn.Module):
    """Real (1) vs. generated (0) logits ``(B, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(64, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


ColourNet: TypeAlias = "ColourCLIP | ColourJudge | RealismCNN"


def clip_loss(model: ColourCLIP, images: Tensor, ids: Tensor) -> Tensor:
    """Symmetric InfoNCE with every same-prompt pair a positive (module docstring)."""
    img, txt = model.encode_image(images), model.encode_text(ids)  # (B, D) each
    logits = model.scale() * img @ txt.T  # (B, B)
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()  # (B, B) same prompt
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _batches(n: int, *, steps: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=gen)


def _fit(net: nn.Module, loss_fn: Callable[[Tensor], Tensor], n: int, *, steps: int, seed: int, lr: float = 2e-3):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    net.train()
    for idx in _batches(n, steps=steps, batch=128, seed=seed):
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def _prompt_ids(labels: Tensor) -> Tensor:
    return tokenize([colour_prompt(*map(int, row)) for row in labels])


@torch.no_grad()
def _held_out_accuracy(clip: ColourCLIP, judge: ColourJudge, x: Tensor, y: Tensor) -> dict[str, float]:
    """Judge accuracy per head, and the proxy's top-1 retrieval of the right prompt among all 96."""
    heads = judge(x)
    acc = {
        f"judge_{k}": float((h.argmax(1) == y[:, i]).float().mean())
        for i, (k, h) in enumerate(zip(("shape", "colour", "background"), heads))
    }
    prompts = all_prompts()
    sims = clip.encode_image(x) @ clip.encode_text(tokenize(prompts)).T  # (N, 96)
    truth = torch.tensor([prompts.index(colour_prompt(*map(int, r))) for r in y])
    acc["clip_top1"] = float((sims.argmax(1) == truth).float().mean())
    return acc


def _train_realism(
    real: Tensor,
    real_test: Tensor,
    fake: Tensor,
    *,
    reconstruct: Callable[[Tensor], Tensor] | None,
    steps: int,
    seed: int,
) -> tuple[nn.Module, float]:
    """Real (train split) vs. the first 80 % of ``fake``; accuracy on held-out real vs. the last 20 %.

    With ``reconstruct`` (the VAE round trip) the real class is the reconstructions of ``real`` /
    ``real_test``, so the detector looks past the decoder's own blur (:func:`train_colour_scorers`).
    """
    n_tr = len(fake) * 4 // 5
    n_te = len(fake) - n_tr
    real, real_test = real[:n_tr], real_test[:n_te]
    if reconstruct is not None:
        real, real_test = reconstruct(real), reconstruct(real_test)
    rx = torch.cat([real, fake[:n_tr]])
    ry = torch.cat([torch.ones(n_tr), torch.zeros(n_tr)]).long()
    torch.manual_seed(seed)
    net = RealismCNN()
    _fit(net, lambda i: F.cross_entropy(net(rx[i]), ry[i]), len(rx), steps=steps, seed=seed)
    with torch.no_grad():
        pred = net(torch.cat([real_test, fake[n_tr:]])).argmax(1)
    return net, float((pred == torch.cat([torch.ones(n_te), torch.zeros(n_te)]).long()).float().mean())


def train_colour_scorers(
    out_dir: str | Path,
    *,
    fake_images: Tensor,
    reconstruct: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    steps: int = 400,
    num_real: int = 8192,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train and save the CLIP proxy, the judge and the realism detector (atomic write).

    Args:
        out_dir: target directory (written via a temporary sibling and renamed).
        fake_images: ``(N, 3, 32, 32)`` base-model samples in [-1, 1] for the realism detector.
        reconstruct: the VAE round trip (images in [-1, 1]); given, the detector's real class is VAE
            reconstructions of real scenes (raw scenes made it score every decoded sample ~0). None: raw.
        seed: RNG seed (the judge uses ``seed + 1``, the detector ``seed + 2``).
        steps: optimiser steps of each network (batch 128).
        num_real: real training images (the training split's first ``num_real``).
        log: progress sink.

    Returns:
        Held-out accuracies (judge per head, the proxy's prompt retrieval, the detector).
    """
    from services.data.colour import TEST_SEED, TRAIN_SEED

    x, y = colour_dataset(num_real, TRAIN_SEED)
    ids = _prompt_ids(y)
    torch.manual_seed(seed)
    clip = ColourCLIP()
    _fit(clip, lambda i: clip_loss(clip, x[i], ids[i]), len(x), steps=steps, seed=seed)
    torch.manual_seed(seed + 1)
    judge = ColourJudge()
    _fit(
        judge,
        lambda i: functools.reduce(operator.add, [F.cross_entropy(h, y[i, k]) for k, h in enumerate(judge(x[i]))]),
        len(x),
        steps=steps,
        seed=seed + 1,
    )
    xt, yt = colour_dataset(1024, TEST_SEED)
    acc = _held_out_accuracy(clip, judge, xt, yt)
    realism, acc["realism"] = _train_realism(x, xt, fake_images, reconstruct=reconstruct, steps=steps, seed=seed + 2)
    acc.update(
        realism_real_is_reconstruction=float(reconstruct is not None), clip_logit_scale=float(clip.scale().detach())
    )
    log(f"colour scorers held-out: {acc}")
    _save(Path(out_dir), {"clip": clip, "judge": judge, "realism": realism}, dict(seed=seed, steps=steps, accuracy=acc))
    return acc


def _save(out_dir: Path, nets: dict[str, nn.Module], meta: dict) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-colour-scorers-"))
    for name, net in nets.items():
        torch.save(net.state_dict(), tmp / f"{name}.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "vocab": list(VOCAB)}))
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def load_net(path: str | Path | None, which: str) -> ColourNet:
    """A saved scorer network (``which``: clip, judge or realism) from a directory of :func:`train_colour_scorers`."""
    if path is None:
        raise ValueError(f"colour_{which}: needs path= the scorer directory (written by prepare_colour)")
    p = Path(path) / f"{which}.pt"
    if not p.is_file():
        raise FileNotFoundError(f"colour_{which}: no {p.name} under {path}; run prepare_colour first")
    net: ColourNet = {"clip": ColourCLIP, "judge": ColourJudge, "realism": RealismCNN}[which]()
    net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False)
