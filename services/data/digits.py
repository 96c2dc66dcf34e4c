"""The data of the embedded default: scikit-learn's digits, their prompts and the fixed train / test split.

The digits generator (``services.models.digits``) pretrains on the train part, the digits scorers
(``services.rewards.digits``) train on it and are judged on the test part, and ``services.prepare``
reads the test part as the real images of the Frechet distance; all of them read it from here.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NULL_CLASS", "digit_prompt", "digits_dataset", "parse_digit_prompt", "split_indices"]

NULL_CLASS = 10
_PROMPT = re.compile(r"^\s*(?:an?\s+)?(?:handwritten\s+)?digit\s+([0-9])\s*$", re.IGNORECASE)


def parse_digit_prompt(prompt: str) -> int:
    """``"a handwritten digit 3"`` -> 3; ``""`` -> the null class; anything else is an error."""
    if prompt.strip() == "":
        return NULL_CLASS
    m = _PROMPT.match(prompt)
    if not m:
        raise ValueError(f"digits prompts look like 'a handwritten digit 3' (0-9) or '' (null); got {prompt!r}")
    return int(m.group(1))


def digit_prompt(label: int) -> str:
    """The canonical prompt of a class."""
    return f"a handwritten digit {label}"


def digits_dataset(resolution: int = 16) -> tuple[Tensor, Tensor]:
    """All 1797 sklearn digits as ``(N, 1, R, R)`` in [-1, 1] and ``(N,)`` labels."""
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    d = load_digits()
    assert isinstance(d, Bunch), "load_digits() returns a Bunch (return_X_y=False, its default)"
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x * 2.0 - 1.0, torch.tensor(d.target, dtype=torch.long)


def split_indices(n: int, *, test_fraction: float = 0.2, seed: int = 1234) -> tuple[Tensor, Tensor]:
    """A fixed train / test split of the digits (the judges evaluate on the test part)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(n * test_fraction)
    return perm[n_test:], perm[:n_test]
