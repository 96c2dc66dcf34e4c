"""Prompt sets: inline lists or files (txt / jsonl / csv), a separate evaluation set, epoch shuffling.

Real runs train on prompt files of thousands of lines with a held-out evaluation set (flow_grpo's
``dataset/pickscore/{train,test}.txt``, GenEval's ``train_metadata.jsonl`` whose rows carry the
objects to count, the OCR sets). Formats, by suffix:

* ``.txt``: one prompt per non-empty line;
* ``.jsonl``: one JSON object per line with a ``prompt`` key; every other key is the row's metadata,
  handed to scorers that take a ``metadata`` argument (rule-based rewards such as GenEval's);
* ``.csv``: a header with a ``prompt`` column; the other columns are metadata.

The order is deterministic: RL step ``s`` uses the prompt groups ``g = s * P .. s * P + P - 1`` of the
cursor, and group ``g`` is prompt ``order(epoch)[g mod N]`` with ``epoch = g // N``: a fresh
permutation of the file per epoch (seeded by ``train.seed`` and the epoch), or the file order with
``data.shuffle: false``. The cursor is ``step * P``, so a resumed run continues with exactly the
prompts it would have seen; the checkpoint also records the prompt set's fingerprint, and a resume on
a changed file is refused.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from normguard_core.seeding import prompt_order_seed

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["PromptSet", "load_prompt_file", "prompt_sets"]


@dataclass(frozen=True)
class PromptSet:
    """``N`` prompts with optional per-prompt metadata and a deterministic order per epoch."""

    prompts: tuple[str, ...]
    metadata: tuple[dict, ...] | None = None
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a prompt set needs at least one prompt")
        if self.metadata is not None and len(self.metadata) != len(self.prompts):
            raise ValueError(f"{len(self.metadata)} metadata rows for {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the prompts and metadata, in file order (what a resume checks)."""
        blob = json.dumps([self.prompts, self.metadata], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def index(self, cursor: int) -> int:
        """The prompt of group ``cursor``: ``order(cursor // N)[cursor mod N]``."""
        n = len(self.prompts)
        epoch, pos = divmod(cursor, n)
        return int(_epoch_order(n, self.seed, epoch)[pos]) if self.shuffle else pos

    def row(self, cursor: int) -> tuple[str, dict | None]:
        i = self.index(cursor)
        return self.prompts[i], (self.metadata[i] if self.metadata is not None else None)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of epoch ``epoch`` (one per epoch, cached: every group of a step reads it)."""
    g = torch.Generator().manual_seed(prompt_order_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def load_prompt_file(path: str | Path, *, shuffle: bool = False, seed: int = 0) -> PromptSet:
    """A :class:`PromptSet` from a ``.txt``, ``.jsonl`` or ``.csv`` file (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    suffix = p.suffix.lower()
    prompts: list[str] = []
    meta: list[dict] = []
    if suffix == ".txt":
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        return PromptSet(tuple(prompts), None, shuffle, seed)
    if suffix == ".jsonl":
        for n, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}:{n}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{p}:{n}: each line must be an object with a string "prompt"')
            prompts.append(row.pop("prompt"))
            meta.append(row)
    elif suffix == ".csv":
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            if "prompt" not in (reader.fieldnames or []):
                raise ValueError(f'{p}: the header must have a "prompt" column, got {reader.fieldnames}')
            for row in reader:
                prompts.append(row.pop("prompt"))
                meta.append(row)
    else:
        raise ValueError(f"{p}: unknown prompt file type {suffix!r} (use .txt, .jsonl or .csv)")
    has_meta = any(meta)
    return PromptSet(tuple(prompts), tuple(meta) if has_meta else None, shuffle, seed)


def prompt_sets(cfg: ExperimentConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, eval)`` prompt sets of an ExperimentConfig: ``data.train_prompts`` / ``data.eval_prompts``
    files when given, else the inline ``prompts`` (evaluation: the first ``eval.num_prompts`` of the
    training prompts, the behaviour before prompt files)."""
    d = cfg.data
    if d.train_prompts:
        train = load_prompt_file(d.train_prompts, shuffle=d.shuffle, seed=cfg.train.seed)
    else:  # the inline list, in its order (a handful of prompts cycled: nothing to shuffle)
        train = PromptSet(tuple(cfg.prompts))
    ev = load_prompt_file(d.eval_prompts) if d.eval_prompts else PromptSet(train.prompts, train.metadata)
    return train, ev
