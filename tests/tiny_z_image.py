"""A tiny random ``ZImagePipeline`` (no hub access): a byte-level Qwen3 tokenizer with a chat template built in
memory, a tiny ``Qwen3ForCausalLM`` text encoder, a tiny ``ZImageTransformer2DModel`` and the tiny VAE of
``tests.tiny_models``.

The chat template follows the shape of Qwen3's (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, the
assistant header with ``add_generation_prompt``, and the empty ``<think>\\n\\n</think>\\n\\n`` block only when
``enable_thinking`` is false): diffusers' ``ZImagePipeline._encode_prompt`` calls it with
``add_generation_prompt=True, enable_thinking=True``, so no think block is added there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import _bytes_to_unicode, _scheduler, _vae

QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_WORDS = ("photo", "cat", "user", "assistant")


def qwen3_tokenizer():
    """A byte-level BPE ``Qwen2Tokenizer`` (Qwen3's class) with a few merges, Qwen3's special tokens and a chat
    template; pads on the right with ``<|endoftext|>`` as Qwen3's does."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    merges = []
    for w in _WORDS:
        cur = list(w)
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1]] + cur[2:]
    for s in _SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(dict.fromkeys(merges)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="right",
    )
    tok.add_special_tokens({"additional_special_tokens": list(_SPECIALS[1:])})
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def _qwen3(tok, hidden: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,  # the pipeline reads hidden_states[-2]: the first layer's output
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id,
    )
    return Qwen3ForCausalLM(cfg)


def save_tiny_z_image(path: Path, scheduler_config: dict | None = None) -> Path:
    """A tiny ZImagePipeline saved with ``save_pretrained`` (64x64 images, (16, 32, 32) latents, 256 image
    tokens after the transformer's 2x2 patches); ``scheduler_config``: e.g. Z-Image-Turbo's
    (``tiny_models.published_config("z-image", "scheduler")``), default the same static shift 3."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(0)
    tok, text_width = qwen3_tokenizer(), 32
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=text_width,
        axes_dims=[4, 6, 6],  # head_dim 16
        axes_lens=[512, 64, 64],
    )
    with torch.no_grad():  # the pad tokens are zero-initialised; make them matter, as trained ones do
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipe = ZImagePipeline(
        transformer=transformer,
        scheduler=_scheduler(scheduler_config, shift=3.0, use_dynamic_shifting=False),
        vae=_vae(16),
        text_encoder=_qwen3(tok, text_width),
        tokenizer=tok,
    )
    pipe.save_pretrained(path)
    return path
