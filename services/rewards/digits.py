"""Scorers of the embedded default, trained by the project on sklearn digits.

* ``digits_classifier`` - P(prompted digit) from a small CNN (saturated on the base model: 0.97-0.99).
* ``digits_ink`` - the default reward proxy: ``P_classifier(prompted digit) * min(1, ink / ink_target)``
  with ink the mean pixel intensity. Real digits carry ink 0.31 +- 0.03 and the default target is
  0.6, so the base model scores about 0.5: there is room to improve, and an obvious way to game it
  (bolder, blotted strokes that the CNN still accepts), in the spirit of DDPO's compressibility
  rewards (Black et al. 2023). Nothing about ink enters the judges below.
* ``digits_judge`` - an independent judge never used for training: an MLP classifier (another
  architecture, other seed), P(prompted digit).
* ``digits_realism`` - forensic realism: a CNN detector of real digits vs. base-model samples,
  P(real).
* :func:`frechet_distance` - a set-level Frechet distance between generated and real test
  digits in the judge's penultimate feature space (FID's formula on our own features).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normguard_core.seeding import JUDGE_STREAM, REALISM_STREAM, offset_seed
from services.data.digits import digits_dataset, parse_digit_prompt, split_indices
from services.rewards.base import validate_images

__all__ = ["DigitScorer", "InkScorer", "frechet_distance", "train_digit_scorers"]


class _CNN(nn.Module):
    def __init__(self, num_out: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.LazyLinear(num_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _MLP(nn.Module):
    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(num_in, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU())
        self.head = nn.Linear(64, num_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _to_gray(images: Tensor, resolution: int) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, R, R) in [-1, 1]."""
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0


class DigitScorer:
    """P(prompted digit) (``kind="class"``) or P(real) (``kind="realism"``) from a trained net."""

    def __init__(
        self, name: str, net: _CNN | _MLP, *, kind: str, resolution: int, device: str | torch.device = "cpu"
    ) -> None:
        self.name, self.kind, self.resolution = name, kind, resolution
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)

    def logits(self, images: Tensor) -> Tensor:
        """Differentiable logits of ``(B, 3, H, W)`` images in [0, 1]."""
        return self.net(_to_gray(images.to(self.device), self.resolution))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``(B, F)`` (used by the Frechet distance)."""
        return self.net.features(_to_gray(images.to(self.device), self.resolution))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        with torch.no_grad():
            return self.differentiable_score(images, prompts).cpu()

    def differentiable_score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The score with gradients w.r.t. the images (for the adjoint analysis)."""
        probs = self.logits(images).softmax(dim=-1)
        if self.kind == "realism":
            return probs[:, 1].float()
        labels = torch.tensor([parse_digit_prompt(p) for p in prompts], device=probs.device)
        if (labels > 9).any():
            raise ValueError(f"{self.name}: every prompt must name a digit 0-9 to be scored")
        return probs.gather(1, labels[:, None]).squeeze(1).float()


class InkScorer(DigitScorer):
    """``P(prompted digit) * min(1, ink / ink_target)``: a proxy with room to rise and to be hacked."""

    def __init__(
        self, name: str, net: _CNN | _MLP, *, resolution: int, ink_target: float, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__(name, net, kind="class", resolution=resolution, device=device)
        if not 0 < ink_target <= 1:
            raise ValueError(f"{name}: ink_target must be in (0, 1], got {ink_target}")
        self.ink_target = ink_target

    def differentiable_score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        ink = images.to(self.device).float().mean(dim=(1, 2, 3))  # (B,) mean intensity in [0, 1]
        return super().differentiable_score(images, prompts) * (ink / self.ink_target).clamp(max=1.0)


def _fit(net: nn.Module, x: Tensor, y: Tensor, *, epochs: int, seed: int, augment: bool) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    net(x[:2])  # materialise lazy layers
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            if augment:  # light noise so the proxy is not trivially fooled by off-manifold pixels
                xb = (xb + 0.1 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).float().mean())


def train_digit_scorers(
    out_dir: str | Path, *, fake_images: Tensor, resolution: int = 16, seed: int = 0, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Train and save the classifier proxy, the judge and the realism detector (atomic write).

    Args:
        out_dir: target directory (written via a temporary sibling and renamed).
        fake_images: ``(N, 1, R, R)`` base-model samples in [-1, 1] for the realism detector.
        resolution: R.
        seed: RNG seed.
        log: progress sink.

    Returns:
        Held-out accuracies ``{"classifier": ..., "judge": ..., "realism": ...}``.
    """
    torch.manual_seed(seed)
    x, y = digits_dataset(resolution)
    tr, te = split_indices(len(y))
    clf = _fit(_CNN(10), x[tr], y[tr], epochs=15, seed=seed, augment=True)
    judge = _fit(
        _MLP(resolution * resolution, 10), x[tr], y[tr], epochs=30, seed=offset_seed(seed, JUDGE_STREAM), augment=False
    )
    n_fake = min(len(fake_images), len(tr))
    fake_tr, fake_te = fake_images[: n_fake * 4 // 5], fake_images[n_fake * 4 // 5 : n_fake]
    rx = torch.cat([x[tr][: len(fake_tr)], fake_tr])
    ry = torch.cat([torch.ones(len(fake_tr), dtype=torch.long), torch.zeros(len(fake_tr), dtype=torch.long)])
    realism = _fit(_CNN(2), rx, ry, epochs=15, seed=offset_seed(seed, REALISM_STREAM), augment=False)
    acc = {
        "classifier": _accuracy(clf, x[te], y[te]),
        "judge": _accuracy(judge, x[te], y[te]),
        "realism": _accuracy(
            realism,
            torch.cat([x[te][: len(fake_te)], fake_te]),
            torch.cat([torch.ones(len(fake_te)), torch.zeros(len(fake_te))]).long(),
        ),
    }
    log(f"digit scorers held-out accuracy: {acc}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-scorers-"))
    for name, net in (("classifier", clf), ("judge", judge), ("realism", realism)):
        torch.save(net.state_dict(), tmp / f"{name}.pt")
    (tmp / "meta.json").write_text(json.dumps(dict(resolution=resolution, seed=seed, accuracy=acc)))
    try:
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return acc


def _load(path: str | None, which: str, device: str | torch.device) -> tuple[_CNN | _MLP, int]:
    if path is None:
        raise ValueError(f"digits_{which}: needs path= the scorer directory (written by `normguard prepare`)")
    p = Path(path)
    if not (p / f"{which}.pt").is_file():
        raise FileNotFoundError(f"digits_{which}: no {which}.pt under {p}; run `normguard prepare` first")
    res = json.loads((p / "meta.json").read_text())["resolution"]
    net: _CNN | _MLP = {
        "classifier": lambda: _CNN(10),
        "judge": lambda: _MLP(res * res, 10),
        "realism": lambda: _CNN(2),
    }[which]()
    net(torch.zeros(1, 1, res, res))
    net.load_state_dict(torch.load(p / f"{which}.pt", map_location="cpu", weights_only=True))
    return net, res


def _classifier(path: str | None = None, device: str | torch.device = "cpu") -> DigitScorer:
    net, res = _load(path, "classifier", device)
    return DigitScorer("digits_classifier", net, kind="class", resolution=res, device=device)


def _ink(path: str | None = None, device: str | torch.device = "cpu", ink_target: float = 0.6) -> InkScorer:
    net, res = _load(path, "classifier", device)
    return InkScorer("digits_ink", net, resolution=res, ink_target=ink_target, device=device)


def _judge(path: str | None = None, device: str | torch.device = "cpu") -> DigitScorer:
    net, res = _load(path, "judge", device)
    return DigitScorer("digits_judge", net, kind="class", resolution=res, device=device)


def _realism(path: str | None = None, device: str | torch.device = "cpu") -> DigitScorer:
    net, res = _load(path, "realism", device)
    return DigitScorer("digits_realism", net, kind="realism", resolution=res, device=device)


FD_EPS = 1e-6  # pytorch-fid's offset on the covariances' diagonal for a singular product
FD_IMAG_ATOL = 1e-3  # pytorch-fid's bound on the root's imaginary diagonal (numerical error below it)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between ``(N, F)`` feature sets.

    As pytorch-fid (mseitzer/pytorch-fid ``src/pytorch_fid/fid_score.py``, ``calculate_frechet_distance``):
    when the root of the covariances' product is not finite, ``FD_EPS * I`` is added to both covariances'
    diagonals and the root taken again; a complex root keeps its real part when its diagonal's imaginary
    part is within ``FD_IMAG_ATOL`` of 0, else ``ValueError`` (as there). Two differences, both for the
    scipy this runs on (>= 1.16, whose ``sqrtm`` was rewritten): it flags a singular product with a finite
    root and a "Matrix is singular" warning, which here takes the offset too, so that an evaluation with
    fewer samples than features no longer prints it (only then does the value differ from the plain
    formula); and its ``disp`` argument is deprecated, so the root is asked for without it (the same root:
    pytorch-fid's ``disp=False`` only asked for the error estimate, which is not used).
    """
    a, b = feats_a.double().cpu().numpy(), feats_b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, singular = _sqrtm(s_a @ s_b)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(s_a.shape[0]) * FD_EPS
        covmean, _ = _sqrtm((s_a + offset) @ (s_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.imag(np.diagonal(covmean)), 0, atol=FD_IMAG_ATOL):
            raise ValueError(
                f"the Frechet distance's matrix root has an imaginary part {np.abs(np.imag(covmean)).max()}"
            )
        covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2.0 * covmean))


def _sqrtm(m: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's ``sqrtm`` of ``m`` and whether it found ``m`` singular (that warning kept, others passed on)."""
    from scipy import linalg

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        root = np.asarray(linalg.sqrtm(m))  # an array: without disp=False sqrtm returns no error estimate
    singular = False
    for w in caught:
        if issubclass(w.category, linalg.LinAlgWarning) and str(w.message).startswith("Matrix is singular"):
            singular = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return root, singular
