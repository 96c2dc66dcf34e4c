"""The published transformers of issue #37's four new families, built on the meta device, counted.

    python benchmarks/meta_families.py            # one table: parameters, LoRA targets, activation shapes
    python benchmarks/meta_families.py --names    # also every distinct Linear-name suffix of each transformer

Each ``deploy/architectures/<model>/transformer_config.json`` (the published ``transformer/config.json``;
where each one was read is in ``docs/wip/families.md``) is built with the installed diffusers 0.42.1 class
under ``torch.device("meta")`` (no storage, a few seconds on CPU) through ``from_config``, the way
``from_pretrained`` reads it (keys the class does not take, e.g. Qwen-Image's ``pooled_projection_dim``,
are dropped). It prints the parameter count and, for the LoRA targets of the source followed
(X-GenGroup/Flow-Factory ``default_target_modules``, ``src/flow_factory/models/*/``), which target
names match a module (PEFT matches a target as a suffix of the module's dotted name; a target that matches
nothing is silently ignored as long as one other does) and the LoRA parameters per unit of rank.
The activation shapes are the source training recipe's (Flow-Factory ``examples/grpo/lora/*``):
the image-token sequence length at its resolution (and frames), the hidden width, the blocks and heads.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

ARCH = Path(__file__).resolve().parents[1] / "deploy" / "architectures"

_QWEN_FF = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2.proj", "txt_mlp.net.0.proj", "txt_mlp.net.2.proj",
)  # fmt: skip
_FLUX2_FF = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj", "attn.to_out.0",
)  # fmt: skip
_ZIMAGE_FF = (
    "attention.to_k", "attention.to_q", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
)  # fmt: skip
_WAN_FF = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)  # fmt: skip


@dataclass(frozen=True)
class Model:
    """One published transformer, its Flow-Factory LoRA targets and its training recipe's latent geometry."""

    name: str  # the directory under deploy/architectures
    cls: str  # the diffusers class
    targets: tuple[str, ...]
    resolution: int  # the recipe's training resolution (square, pixels)
    frames: int = 1  # video frames of the recipe (1 for images)
    spatial: int = 16  # pixels per image token: VAE compression x patch
    temporal: int = 4  # video frames per latent frame after the first (Wan VAE)

    def image_tokens(self) -> int:
        side = self.resolution // self.spatial
        latent_frames = (self.frames - 1) // self.temporal + 1 if self.frames > 1 else 1
        return latent_frames * side * side


MODELS = (
    Model("qwen-image", "QwenImageTransformer2DModel", _QWEN_FF, 512),
    Model("flux2-dev", "Flux2Transformer2DModel", _FLUX2_FF, 512),
    Model("flux2-klein-4b", "Flux2Transformer2DModel", _FLUX2_FF, 384),
    Model("flux2-klein-9b", "Flux2Transformer2DModel", _FLUX2_FF, 384),
    Model("z-image", "ZImageTransformer2DModel", _ZIMAGE_FF, 512),
    Model("wan2.1-t2v-14b", "WanTransformer3DModel", _WAN_FF, 256, frames=5),
    Model("wan2.1-t2v-1.3b", "WanTransformer3DModel", _WAN_FF, 256, frames=5),
    Model("wan2.2-t2v-a14b", "WanTransformer3DModel", _WAN_FF, 480, frames=5),
)
BY_NAME = {m.name: m for m in MODELS}


def config(name: str) -> dict:
    """The published transformer config of ``name`` (``deploy/architectures/<name>/transformer_config.json``)."""
    return json.loads((ARCH / name / "transformer_config.json").read_text())


def build(name: str) -> torch.nn.Module:
    """The transformer of ``name`` on the meta device, through ``from_config`` as ``from_pretrained`` reads it."""
    import diffusers

    cls = getattr(diffusers, BY_NAME[name].cls)
    with torch.device("meta"):
        return cls.from_config(config(name))


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, list[str]]:
    """For each target, the Linear modules it matches as PEFT does (the full name, or a ``.``-suffix of it)."""
    out: dict[str, list[str]] = {t: [] for t in targets}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        for t in targets:
            if mod_name == t or mod_name.endswith("." + t):
                out[t].append(mod_name)
    return out


def lora_per_rank(model: torch.nn.Module, targets: tuple[str, ...]) -> int:
    """LoRA parameters per unit of rank: ``in + out`` features of every distinct matched Linear."""
    names = {n for mods in matched(model, targets).values() for n in mods}
    linears = dict(model.named_modules())
    return sum(linears[n].in_features + linears[n].out_features for n in names)


def shapes(name: str, model: torch.nn.Module) -> dict[str, int]:
    """The activation-relevant shapes: hidden width, blocks, heads, image tokens at the recipe's resolution."""
    c = model.config
    if "dim" in c:  # Z-Image
        hidden, heads, blocks = c.dim, c.n_heads, c.n_layers + 2 * c.n_refiner_layers
    else:
        heads = c.num_attention_heads
        hidden = heads * c.attention_head_dim
        blocks = c.num_layers + c.get("num_single_layers", 0)
    return {"hidden": hidden, "heads": heads, "blocks": blocks, "image_tokens": BY_NAME[name].image_tokens()}


def suffixes(model: torch.nn.Module) -> list[str]:
    """Every distinct Linear name with the block indices dropped (``transformer_blocks.3.attn.to_q`` -> ...)."""
    out = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out.add(re.sub(r"^(\w+)\.\d+\.", r"\1.*.", mod_name))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", action="store_true", help="print every Linear-name suffix of each transformer")
    args = ap.parse_args(argv)
    print(
        f"{'model':18} {'params':>15} {'lora/rank':>10} {'hidden':>6} {'blocks':>6} {'heads':>5} {'tokens':>6}  unmatched"
    )
    for m in MODELS:
        tr = build(m.name)
        missing = [t for t, mods in matched(tr, m.targets).items() if not mods]
        s = shapes(m.name, tr)
        print(
            f"{m.name:18} {parameters(tr):>15,} {lora_per_rank(tr, m.targets):>10,} {s['hidden']:>6} "
            f"{s['blocks']:>6} {s['heads']:>5} {s['image_tokens']:>6}  {', '.join(missing) or '-'}"
        )
        if args.names:
            print("    " + "\n    ".join(suffixes(tr)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
