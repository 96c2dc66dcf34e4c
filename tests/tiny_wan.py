"""A tiny random ``WanPipeline`` (Wan 2.1 / 2.2 text-to-video) saved with ``save_pretrained``, built offline.

The transformer and VAE are the diffusers test sizes (``tests/pipelines/wan/test_wan.py``: 2 heads of 12, a
3-channel-base ``AutoencoderKLWan`` with the 4x temporal / 8x spatial compression of the real one), the text
encoder a 2-layer random ``UMT5EncoderModel`` of width 32 (the transformer's ``text_dim``) with the offline T5
tokenizer of ``tests/tiny_models``. Sized for CI: 5 frames of 32x32 are latents ``(16, 2, 4, 4)``, 8 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import t5_tokenizer

__all__ = ["save_tiny_wan"]


def _scheduler(config: dict | None):
    """The scheduler ``config`` names (its ``_class_name``: the published ``UniPCMultistepScheduler``, or a
    ``FlowMatchEulerDiscreteScheduler`` carrying its ``shift``)."""
    import diffusers

    if config is None:
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def save_tiny_wan(path: Path, scheduler_config: dict | None = None, *, boundary_ratio: float | None = None) -> Path:
    """A tiny ``WanPipeline`` at ``path``; ``scheduler_config``: a scheduler config (its ``_class_name`` is
    built), default ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (the published ``flow_shift``);
    ``boundary_ratio``: Wan 2.2 A14B's layout, a second expert ``transformer_2`` below that ratio."""
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    transformer = _transformer()
    second = _transformer() if boundary_ratio is not None else None
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    text = UMT5EncoderModel(
        UMT5Config(
            vocab_size=256, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8
        )
    )
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(), text_encoder=text, vae=vae, scheduler=_scheduler(scheduler_config),
        transformer=transformer, transformer_2=second, boundary_ratio=boundary_ratio,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return path
