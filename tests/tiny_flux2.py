"""Tiny random FLUX.2 pipelines (``Flux2Pipeline`` for [dev], ``Flux2KleinPipeline`` for [klein]) saved with
``save_pretrained``, with tokenizers built offline (no hub access).

The text encoders keep the layers the pipelines read (diffusers ``pipelines/flux2``: dev stacks the hidden states
of Mistral-3 layers 10, 20, 30; Klein those of Qwen3 layers 9, 18, 27), so the tiny ones have 31 / 28 layers of
width 16, and the transformer's ``joint_attention_dim`` is 3 x 16. The tokenizers carry a chat template shaped
like the real ones' (Mistral's ``[SYSTEM_PROMPT]`` / ``[INST]`` with content lists; Qwen3's ``<|im_start|>`` with
the empty think block that ``enable_thinking=False`` adds), since both pipelines tokenise through
``apply_chat_template``. The VAE (``AutoencoderKLFlux2``) gets non-trivial BatchNorm running statistics, which the
pipelines' latent (de)normalisation reads. 64 px images: 32 x 32 x 4 VAE latents, 256 packed tokens of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import _bytes_to_unicode

HIDDEN = 16  # text-encoder width; the transformer's joint_attention_dim is 3 x HIDDEN (three stacked layers)
MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
    "[/SYSTEM_PROMPT]{% else %}[INST]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/INST]{% endif %}"
    "{% endfor %}"
)
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _tokenizer(specials: list[str], template: str):
    """A byte-level BPE tokenizer (Qwen2's) with ``specials`` and a chat template; pad = the first special."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    merges = []
    for w in ("a", "photo", "of", "cat", "red", "bicycle"):
        cur = list(w)
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1]] + cur[2:]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=list(dict.fromkeys(merges)), pad_token=specials[0], eos_token=specials[1], unk_token=None
    )
    tok.add_special_tokens({"additional_special_tokens": specials[2:]})
    tok.chat_template = template
    tok.model_max_length = 512
    return tok


def _vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the latent statistics the pipelines (de)normalise with: not the identity
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


def _transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * HIDDEN,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def _scheduler(config: dict | None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config or {"use_dynamic_shifting": True})


def save_tiny_flux2_dev(path: Path, scheduler_config: dict | None = None) -> Path:
    """A tiny ``Flux2Pipeline``: a 31-layer Mistral-3 text model (with a tiny Pixtral vision tower, unused for
    text), the guidance embedding; ``scheduler_config`` default: dynamic shifting (the pipeline's ``mu``)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tok = _tokenizer(
        ["<pad>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]"], MISTRAL_TEMPLATE
    )
    text = dict(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=31, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )  # fmt: skip
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8, patch_size=4,
        image_size=16,
    )  # fmt: skip
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    pipe = Flux2Pipeline(
        scheduler=_scheduler(scheduler_config),
        vae=_vae(),
        text_encoder=Mistral3ForConditionalGeneration(cfg),
        tokenizer=tok,
        transformer=_transformer(guidance_embeds=True),
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_flux2_klein(path: Path, scheduler_config: dict | None = None, *, is_distilled: bool = False) -> Path:
    """A tiny ``Flux2KleinPipeline``: a 28-layer Qwen3 causal LM, no guidance embedding, real CFG with the empty
    negative prompt unless ``is_distilled`` (the pipeline-config flag)."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = _tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"], QWEN3_TEMPLATE)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    pipe = Flux2KleinPipeline(
        scheduler=_scheduler(scheduler_config),
        vae=_vae(),
        text_encoder=Qwen3ForCausalLM(cfg),
        tokenizer=tok,
        transformer=_transformer(guidance_embeds=False),
        is_distilled=is_distilled,
    )
    pipe.save_pretrained(path)
    return path
