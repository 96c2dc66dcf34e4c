"""A tiny random ``QwenImagePipeline`` built from configs, with a byte-level BPE tokenizer built offline.

The parts are the stock pipeline's classes (diffusers ``pipelines/qwenimage/pipeline_qwenimage.py``):
``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage`` (5-D latents, ``latents_mean`` / ``latents_std``),
``Qwen2_5_VLForConditionalGeneration`` and a ``Qwen2Tokenizer``. The tokenizer has a merge for every pre-token of
the pipeline's prompt template and of the test prompts' words, so the template's prefix is 34 tokens, as the
real tokenizer's is (``prompt_template_encode_start_idx``): what the pipeline drops is the template, not the
prompt. The scheduler is a published config (``deploy/architectures/qwen-image/scheduler_config.json``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tiny_models import WORDS, _bytes_to_unicode, published_config

TEMPLATE_WORDS = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
)
EXTRA_WORDS = ("red", "bicycle", "bowl", "ramen", "lighthouse", "at", "dusk")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen_tokenizer():
    """A ``Qwen2Tokenizer`` whose merges make each pre-token of the template and of the test words one token."""
    from transformers import Qwen2Tokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    base = Qwen2Tokenizer(vocab=dict(vocab), merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    parts = [*re.split("|".join(map(re.escape, SPECIALS)), TEMPLATE_WORDS), " ".join((*WORDS, *EXTRA_WORDS))]
    split = base.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    pieces = [p for part in parts for p, _ in split(part)]
    merges = []
    for piece in pieces:
        cur = list(piece)
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1]] + cur[2:]
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(dict.fromkeys(merges)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    return tok


def _text_encoder(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=len(tok), video_token_id=len(tok))
    return Qwen2_5_VLForConditionalGeneration(cfg)


def save_tiny_qwen_image(path: Path, scheduler_config: dict | None = None) -> Path:
    """A tiny QwenImagePipeline saved with ``save_pretrained`` (64x64 images; the VAE downsamples 4x, to 16x16x4
    latents, packed 2x2 to (64, 16)); ``scheduler_config``: Qwen-Image's published one by default."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    z = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z,
        out_channels=z,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.3, -0.4],
        latents_std=[1.5, 0.8, 2.0, 1.2],
    )
    config = scheduler_config or published_config("qwen-image", "scheduler")
    pipe = QwenImagePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(config),
        vae=vae,
        text_encoder=_text_encoder(tok),
        tokenizer=tok,
    )
    pipe.save_pretrained(path)
    return path
