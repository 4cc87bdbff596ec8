"""Text encoding shared by sampling (TTTVideoPipeline) and training's precompute, so both see the same embeddings."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_text(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, texts: list[str],
                max_length: int, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Text encoder last hidden states, padded to max_length, as CogVideoXPipeline computes them.

    The encoder sees the padded ids without an attention mask (CogVideoX's convention; the transformer was trained
    on such embeddings), and the padding mask is returned for the TTT layers, where padding must not update the
    state. Training's precompute and text dropout must call this too, so that both sides use the same embeddings.
    Returns embeds (N, max_length, D) and mask (N, max_length) bool, True on real tokens.
    """
    device = device if device is not None else text_encoder.device
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                       return_tensors="pt")
    embeds = text_encoder(inputs.input_ids.to(device))[0]
    return embeds.to(device=device, dtype=dtype or embeds.dtype), inputs.attention_mask.to(device).bool()
