"""Tiny random models built from configs with locally built tokenizers (no hub access).

Recipes from ../shared/ENVIRONMENT.md s3-s4: CLIP BPE / T5 unigram tokenizers built from
in-memory vocabularies, tiny SD3 / FLUX pipelines, a tiny CLIPModel and a tiny LLaVA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = Path(__file__).parents[1] / "deploy" / "architectures"
WORDS = ("a", "photo", "of", "cat", "dog", "handwritten", "digit")


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in WORDS:
        cur = list(w[:-1]) + [w[-1] + "</w>"]
        while len(cur) > 1:
            a, b = cur[0], cur[1]
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            cur = [a + b] + cur[2:]
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(32, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=256)


def _clip_text(cls, vocab_size):
    from transformers import CLIPTextConfig

    return cls(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=256, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4))


def _vae(latent_channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def published_config(model: str, part: str) -> dict:
    """A real model's published config (``deploy/architectures/<model>/<part>_config.json``)."""
    return json.loads((ARCHITECTURES / model / f"{part}_config.json").read_text())


def _scheduler(config: dict | None, **default):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config) if config else FlowMatchEulerDiscreteScheduler(**default)


def save_tiny_sd3(path: Path, scheduler_config: dict | None = None) -> Path:
    """A tiny StableDiffusion3Pipeline saved with save_pretrained (64x64 images, 16x32x32 latents);
    ``scheduler_config``: e.g. a real model's (``published_config``), default shift 3."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=64,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler(scheduler_config, shift=3.0),
        vae=_vae(16),
        text_encoder=_clip_text(CLIPTextModelWithProjection, len(tok)),
        tokenizer=tok,
        text_encoder_2=_clip_text(CLIPTextModelWithProjection, len(tok)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(),
        tokenizer_3=t5_tokenizer(),
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_flux(path: Path, scheduler_config: dict | None = None) -> Path:
    """A tiny FluxPipeline (64x64 images, packed latents (256, 16)); ``scheduler_config``: e.g. FLUX.1-dev's
    (``published_config``), default diffusers' (static shift 1)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = clip_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
        guidance_embeds=True,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=_scheduler(scheduler_config),
        vae=_vae(4),
        text_encoder=_clip_text(CLIPTextModel, len(tok)),
        tokenizer=tok,
        text_encoder_2=_t5(),
        tokenizer_2=t5_tokenizer(),
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_clip(path: Path) -> Path:
    """A tiny CLIPModel + CLIPProcessor (PIL image processor)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    improc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=improc, tokenizer=tok).save_pretrained(path)
    return path


LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_llava(path: Path) -> Path:
    """A tiny LlavaForConditionalGeneration (CLIP vision + Qwen2 text) with the stock processor."""
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        Qwen2Tokenizer,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    for w in ("Yes", "No", "Is", "this", "image"):
        cur = list(w)
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1]] + cur[2:]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(dict.fromkeys(merges)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    improc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=improc,
        tokenizer=tok,
        chat_template=LLAVA_TEMPLATE,
        patch_size=8,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token="<image>",
    ).save_pretrained(path)
    return path


def save_tiny_trocr(path: Path) -> Path:
    """A tiny TrOCR-layout VisionEncoderDecoderModel (ViT encoder, TrOCR decoder) and a tokenizer."""
    from transformers import TrOCRConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    torch.manual_seed(0)
    tok = clip_tokenizer()
    enc = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    dec = TrOCRConfig(
        vocab_size=len(tok),
        d_model=32,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        decoder_start_token_id=0,
    )
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 1, 1
    VisionEncoderDecoderModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bert_tokenizer():
    """A word-level BERT (WordPiece) tokenizer over WORDS, built in memory (bert-base-uncased's special tokens)."""
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))}
    for w in (*WORDS, "red", "blue", "sign", "open", "late"):
        vocab.setdefault(w, len(vocab))
    return BertTokenizer(vocab=vocab, model_max_length=512)


def image_reward_state(*, vit=(32, 2, 8, 32), bert=(32, 2, 64), vocab: int, max_pos: int = 40) -> dict:
    """Random tensors under ImageReward.pt's key names (THUDM/ImageReward: ImageReward.py, models/BLIP/vit.py,
    med.py), written from those modules' attribute names, not from any converter's output.

    ``vit``: (hidden, layers, patch, image size); ``bert``: (hidden, layers, intermediate).
    """
    g = torch.Generator().manual_seed(0)
    dv, nv, patch, size = vit
    dt, nt, inter = bert
    out: dict[str, torch.Tensor] = {}

    def lin(name, n_out, n_in):
        out[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        out[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.1

    def norm(name, d):
        out[f"{name}.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        out[f"{name}.bias"] = 0.1 * torch.randn(d, generator=g)

    v = "blip.visual_encoder"
    out[f"{v}.cls_token"] = torch.randn(1, 1, dv, generator=g) * 0.02
    out[f"{v}.pos_embed"] = torch.randn(1, (size // patch) ** 2 + 1, dv, generator=g) * 0.02
    out[f"{v}.patch_embed.proj.weight"] = torch.randn(dv, 3, patch, patch, generator=g) / (3 * patch * patch) ** 0.5
    out[f"{v}.patch_embed.proj.bias"] = torch.zeros(dv)
    for i in range(nv):
        b = f"{v}.blocks.{i}"
        norm(f"{b}.norm1", dv), lin(f"{b}.attn.qkv", 3 * dv, dv), lin(f"{b}.attn.proj", dv, dv)
        norm(f"{b}.norm2", dv), lin(f"{b}.mlp.fc1", 4 * dv, dv), lin(f"{b}.mlp.fc2", dv, 4 * dv)
    norm(f"{v}.norm", dv)
    t = "blip.text_encoder"
    out[f"{t}.embeddings.word_embeddings.weight"] = torch.randn(vocab, dt, generator=g)
    out[f"{t}.embeddings.position_embeddings.weight"] = torch.randn(max_pos, dt, generator=g) * 0.1
    out[f"{t}.embeddings.position_ids"] = torch.arange(max_pos).expand(1, -1)  # a persistent buffer in med.py
    norm(f"{t}.embeddings.LayerNorm", dt)
    for i in range(nt):
        b = f"{t}.encoder.layer.{i}"
        for att, kv_in in (("attention", dt), ("crossattention", dv)):
            lin(f"{b}.{att}.self.query", dt, dt), lin(f"{b}.{att}.self.key", dt, kv_in)
            lin(f"{b}.{att}.self.value", dt, kv_in), lin(f"{b}.{att}.output.dense", dt, dt)
            norm(f"{b}.{att}.output.LayerNorm", dt)
        (
            lin(f"{b}.intermediate.dense", inter, dt),
            lin(f"{b}.output.dense", dt, inter),
            norm(f"{b}.output.LayerNorm", dt),
        )
    lin("blip.vision_proj", 16, dv), lin("blip.text_proj", 16, dt)  # BLIP_Pretrain's ITC projections (unused)
    for i, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, dt), (128, 1024), (64, 128), (16, 64), (1, 16))):
        lin(f"mlp.layers.{i}", n_out, n_in)
    return out


def save_tiny_image_reward(path: Path) -> Path:
    """A directory like THUDM/ImageReward's: ImageReward.pt (tiny, random), med_config.json, and a tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    tok = bert_tokenizer()
    tok.save_pretrained(path / "tokenizer")
    vocab = len(tok) + 2  # ImageReward adds [DEC] and [ENC] (blip.py init_tokenizer)
    torch.save(image_reward_state(vocab=vocab), path / "ImageReward.pt")
    med = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 40,
        "vocab_size": vocab,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "encoder_width": 32,
        "add_cross_attention": True,
    }
    (path / "med_config.json").write_text(json.dumps(med))
    return path
