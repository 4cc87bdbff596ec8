"""Per-segment noise levels: one time embedding per segment, applied by every adaLN modulation.

docs/model.md, "Per-segment noise levels". With timestep (B, n) the time embedding is (B, n, D_t); the
modulations of norm1, norm2 and norm_out then use the embedding of the segment a token belongs to (text and video of
segment i alike), in canonical order, before the tokens are cut into attention windows. An overlap frame is modulated
with its own segment's embedding (the earlier segment). With a (B,) timestep every function here calls diffusers'
module exactly as CogVideoXBlock does, so the uniform model is unchanged bit for bit.

Per-segment modulations are kept per frame (B, T, 1, W) and per segment (B, n, 1, W) rather than expanded to every
token, so a minute of video costs no extra activation memory.
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero

from .layout import SegmentLayout


def time_embedding(model, timestep: torch.Tensor, dtype: torch.dtype, timestep_cond: torch.Tensor | None = None,
                   ofs: torch.Tensor | None = None) -> torch.Tensor:
    """CogVideoX's time (+ ofs) embedding: timestep (B,) → (B, D_t); timestep (B, n) → (B, n, D_t), one per segment.

    `model` is a CogVideoXTransformer3DModel (time_proj, time_embedding, ofs_proj, ofs_embedding)."""
    per_segment = isinstance(timestep, torch.Tensor) and timestep.dim() == 2
    flat = timestep.flatten() if per_segment else timestep
    if per_segment and timestep_cond is not None:
        timestep_cond = timestep_cond.repeat_interleave(timestep.shape[1], dim=0)
    emb = model.time_embedding(model.time_proj(flat).to(dtype), timestep_cond)
    if per_segment:
        emb = emb.unflatten(0, timestep.shape)  # (B, n, D_t)
    if model.ofs_embedding is not None:
        ofs_emb = model.ofs_embedding(model.ofs_proj(ofs).to(dtype))  # (B, D_t)
        emb = emb + (ofs_emb[:, None] if per_segment else ofs_emb)
    return emb


def layer_norm_zero(norm: CogVideoXLayerNormZero, video: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                    layout: SegmentLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`norm(video, text, temb)` with temb (B, D_t) or per segment (B, n, D_t).

    video: (B, T*hw, W) canonical; text: (B, n*Lt, W). Returns the modulated video and text (same shapes) and their
    gates: (B, 1, W) each for a (B, D_t) temb, else (B, T, 1, W) per frame and (B, n, 1, W) per segment; apply
    them with `gated`.
    """
    if temb.dim() == 2:
        return norm(video, text, temb)
    mods = norm.linear(norm.silu(temb))  # (B, n, 6W)
    shift, scale, gate, enc_shift, enc_scale, enc_gate = (m[:, :, None] for m in mods.chunk(6, dim=-1))
    shift, scale, gate = (m.index_select(1, layout.frame_segment) for m in (shift, scale, gate))  # (B, T, 1, W)
    video = _modulate(norm.norm(video), shift, scale)
    text = _modulate(norm.norm(text), enc_shift, enc_scale)
    return video, text, gate, enc_gate


def ada_layer_norm(norm: AdaLayerNorm, video: torch.Tensor, temb: torch.Tensor, layout: SegmentLayout
                   ) -> torch.Tensor:
    """CogVideoX's norm_out (`AdaLayerNorm`, chunk_dim 1: shift then scale) on video (B, T*hw, W), temb (B, D_t) or
    per segment (B, n, D_t)."""
    if temb.dim() == 2:
        return norm(video, temb=temb)
    shift, scale = (m[:, :, None].index_select(1, layout.frame_segment)
                    for m in norm.linear(norm.silu(temb)).chunk(2, dim=-1))  # (B, T, 1, W)
    return _modulate(norm.norm(video), shift, scale)


def gated(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gate * x for x (B, G*m, W): gate (B, 1, W) broadcast, or (B, G, 1, W), one gate per group of m tokens
    (a frame or a segment's text)."""
    if gate.dim() == 3:
        return gate * x
    return (gate * x.unflatten(1, (gate.shape[1], -1))).flatten(1, 2)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-group shift, scale (B, G, 1, W) on x (B, G*m, W)."""
    return (x.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)
