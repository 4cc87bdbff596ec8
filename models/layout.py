"""Where every token of an n-segment sequence sits: windows, interleave/reverse maps, masks, RoPE tables.

Everything here depends only on the shape (number of segments, frames, text length, latent grid), so it is
computed once per shape (`segment_layout` is cached) and reused by every block and every denoising step.
Design: docs/design.md, "One transformer block with TTT".

Two token arrangements are used:
- canonical: [text_1 .. text_n, video frames 0 .. T-1], i.e. text (B, n*L_text, W) followed by video (B, T*hw, W);
  this is how the model stores its hidden states between blocks.
- windows: segment i's attention window = its text + its latent frames (+ the last frame of segment i-1 when
  overlap_frames = 1), every window padded to one length so that all windows run as one batched attention call.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

TTT_ROPES = ("global", "spatial", "none")  # where the TTT RoPE puts a video token (segment_layout)


def num_latent_frames(num_segments: int, frames_first: int, frames_per_segment: int) -> int:
    """T = first + (n - 1) * per_segment latent frames (13 + 12 (n - 1) for CogVideoX)."""
    return frames_first + (num_segments - 1) * frames_per_segment


def num_segments_for_frames(num_frames: int, frames_first: int, frames_per_segment: int) -> int | None:
    """Inverse of `num_latent_frames`; None when num_frames does not fall on a segment boundary."""
    extra = num_frames - frames_first
    if extra < 0 or extra % frames_per_segment:
        return None
    return extra // frames_per_segment + 1


@dataclass(frozen=True)
class TokenOrder:
    """One order of the whole sequence for the TTT scan (N tokens: num_text text tokens, then video, canonically).

    index: (N,) long, canonical index of each token in this order; inverse: (N,) long, the inverse permutation;
    rope: (cos, sin) each (N, D_ttt) in this order, identity (cos 1, sin 0) on text, or None (model without TTT).
    exchange: None, or under context parallelism (N is then one rank's tokens) what moves the TTT op's inputs to
    every token of the sequence and back (`TTTLayer.forward`'s exchange).
    grid: (h, w) of a frame's tokens (the video tokens are whole frames in raster order; `TTTLayer.neighbours`).
    segment_lengths: how many tokens each segment (its text, then its frames) has in this order, one after another
    (under context parallelism, this rank's segments).
    """

    index: torch.Tensor
    inverse: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    num_text: int
    exchange: object | None = None  # context parallelism: the TTT layer's all-to-alls (models/context_parallel.py)
    grid: tuple[int, int] | None = None
    segment_lengths: tuple[int, ...] = ()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical (B, N, ...) → this order."""
        return x.index_select(1, self.index)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """This order (B, N, ...) → canonical."""
        return x.index_select(1, self.inverse)

    def segment_runs(self) -> list[slice]:
        """The slice of this order that each segment's tokens fill, in order."""
        ends = list(itertools.accumulate(self.segment_lengths))
        return [slice(end - length, end) for end, length in zip(ends, self.segment_lengths)]


@dataclass(frozen=True)
class SegmentLayout:
    """Index maps and tables for one shape. Token counts: Lt text per segment, hw video per frame.

    Attributes (all on one device):
        window_frames: (n, Fw) long, global latent frame of each window slot (padding slots repeat frame 0).
        window_tokens: (n * Fw * hw,) long, canonical video token of each window token.
        window_valid: (V,) long, positions in the flattened windows that hold real (non-padding) tokens.
        windows_are_partition: True when every video token sits in exactly one window, in canonical order.
        overlap_count: (T * hw, 1) float, how many windows hold each video token (for averaging).
        window_attn_mask: (n, 1, Lt + Fw * hw) additive float mask hiding padding keys, or None (no padding).
        window_rope: (cos, sin) each (Fw * hw, D_attn), window-local positions, or None (model without RoPE).
        forward: the TTT order [text_1, video_1, ..., text_n, video_n].
        reverse: the TTT order [text_n, rev(video_n), ..., text_1, rev(video_1)].
        full_rope: (cos, sin) each (T * hw, D_attn) over all frames, for the full-attention baseline, or None.
        frame_segment: (T,) long, the segment each latent frame belongs to (an overlap frame: its own segment, the
            earlier one); per-segment time embeddings are applied through it.
    """

    num_segments: int
    text_len: int
    tokens_per_frame: int
    num_frames: int
    window_frames: torch.Tensor
    window_tokens: torch.Tensor
    window_valid: torch.Tensor
    windows_are_partition: bool
    overlap_count: torch.Tensor
    window_attn_mask: torch.Tensor | None
    window_rope: tuple[torch.Tensor, torch.Tensor] | None
    forward: TokenOrder
    reverse: TokenOrder
    full_rope: tuple[torch.Tensor, torch.Tensor] | None
    frame_segment: torch.Tensor

    @property
    def window_frames_count(self) -> int:
        return self.window_frames.shape[1]

    def to_windows(self, video: torch.Tensor) -> torch.Tensor:
        """Canonical video tokens (B, T*hw, W) → windows (B*n, Fw*hw, W)."""
        b = video.shape[0]
        windows = video.index_select(1, self.window_tokens)  # (B, n*Fw*hw, W)
        return windows.reshape(b * self.num_segments, -1, video.shape[-1])

    def from_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows (B*n, Fw*hw, W) → canonical video tokens (B, T*hw, W); overlapping tokens are averaged."""
        width = windows.shape[-1]
        flat = windows.reshape(-1, self.num_segments * windows.shape[1], width)  # (B, n*Fw*hw, W)
        flat = flat.index_select(1, self.window_valid)
        if self.windows_are_partition:
            return flat
        out = flat.new_zeros(flat.shape[0], self.num_frames * self.tokens_per_frame, width)
        out = out.index_add(1, self.window_tokens.index_select(0, self.window_valid), flat)
        return out / self.overlap_count.to(out.dtype)


def _window_frame_table(num_segments: int, frames_first: int, frames_per_segment: int, overlap: int):
    """(n, Fw) global frame per window slot and (n, Fw) validity."""
    windows = []
    for i in range(num_segments):
        if i == 0:
            windows.append(list(range(frames_first)))
        else:
            end = frames_first + i * frames_per_segment
            windows.append(list(range(end - frames_per_segment - overlap, end)))
    width = max(len(w) for w in windows)
    frames = torch.zeros(num_segments, width, dtype=torch.long)
    valid = torch.zeros(num_segments, width, dtype=torch.bool)
    for i, w in enumerate(windows):
        frames[i, : len(w)] = torch.tensor(w)
        valid[i, : len(w)] = True
    return frames, valid


def frame_segments(num_segments: int, frames_first: int, frames_per_segment: int) -> torch.Tensor:
    """(T,) long: the segment each latent frame belongs to (frames_first frames for segment 0, then
    frames_per_segment each); what per-segment noise levels are applied through, in the model and in training."""
    return torch.cat([torch.full((len(r),), i) for i, r in
                      enumerate(_segment_frames(num_segments, frames_first, frames_per_segment))])


def _segment_frames(num_segments: int, frames_first: int, frames_per_segment: int) -> list[range]:
    starts = [0] + [frames_first + (i - 1) * frames_per_segment for i in range(1, num_segments)]
    ends = [frames_first + i * frames_per_segment for i in range(num_segments)]
    return [range(s, e) for s, e in zip(starts, ends)]


def _ttt_orders(num_segments: int, text_len: int, hw: int, segments: list[range]) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical indices of the interleaved forward order and of the reverse order."""
    video_offset = num_segments * text_len
    frame_tokens = torch.arange(hw)

    def text(i: int) -> torch.Tensor:
        return torch.arange(i * text_len, (i + 1) * text_len)

    def frames(seq) -> list[torch.Tensor]:
        return [video_offset + f * hw + frame_tokens for f in seq]

    forward = [t for i in range(num_segments) for t in [text(i), *frames(segments[i])]]
    reverse = [t for i in reversed(range(num_segments)) for t in [text(i), *frames(reversed(segments[i]))]]
    return torch.cat(forward), torch.cat(reverse)


def _rope_3d(head_dim: int, grid: tuple[int, int], num_frames: int, crops) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=crops, grid_size=grid, temporal_size=num_frames)
    return cos.float(), sin.float()


@functools.lru_cache(maxsize=16)
def segment_layout(
    num_segments: int,
    frames_first: int,
    frames_per_segment: int,
    overlap_frames: int,
    text_len: int,
    grid: tuple[int, int],
    base_grid: tuple[int, int],
    attention_head_dim: int | None,
    ttt_head_dim: int | None,
    device: str = "cpu",
    full_attention: bool = False,
    ttt_rope: str = "global",
) -> SegmentLayout:
    """The layout of one shape (cached).

    grid: (h, w) of the patch grid; base_grid: (h, w) of the model's sample size in patches (window RoPE crops
    the same way diffusers' CogVideoXPipeline does); attention_head_dim: None for models without RoPE;
    ttt_head_dim: None when no TTT RoPE is needed; full_attention: also build the all-frames attention RoPE;
    ttt_rope: "global" (the TTT RoPE at each token's global frame, row and column) or "spatial" (row and column
    only: every frame at temporal position 0, so a key and a query meet at their spatial offset however far apart
    in time they are) or "none" (no TTT RoPE: keys and queries meet by content alone).
    """
    if ttt_rope not in TTT_ROPES:
        raise ValueError(f"ttt_rope must be one of {TTT_ROPES}, got {ttt_rope!r}")
    hw = grid[0] * grid[1]
    num_frames = num_latent_frames(num_segments, frames_first, frames_per_segment)
    frames, valid = _window_frame_table(num_segments, frames_first, frames_per_segment, overlap_frames)
    fw = frames.shape[1]

    tokens = (frames[:, :, None] * hw + torch.arange(hw)).reshape(-1)  # (n*Fw*hw,)
    token_valid = valid[:, :, None].expand(-1, -1, hw).reshape(-1)
    valid_positions = torch.nonzero(token_valid).squeeze(1)
    count = torch.zeros(num_frames * hw).index_add_(0, tokens[valid_positions], torch.ones(len(valid_positions)))
    partition = torch.equal(tokens[valid_positions], torch.arange(num_frames * hw))

    attn_mask = None
    if not bool(valid.all()):
        key_valid = torch.cat([torch.ones(num_segments, text_len, dtype=torch.bool),
                               valid[:, :, None].expand(-1, -1, hw).reshape(num_segments, -1)], dim=1)
        attn_mask = torch.zeros(key_valid.shape).masked_fill(~key_valid, float("-inf"))[:, None, :]

    window_rope = full_rope = None
    if attention_head_dim is not None:
        crops = get_resize_crop_region_for_grid(grid, base_grid[1], base_grid[0])
        window_rope = _rope_3d(attention_head_dim, grid, fw, crops)
        if full_attention:
            full_rope = _rope_3d(attention_head_dim, grid, num_frames, crops)

    segments = _segment_frames(num_segments, frames_first, frames_per_segment)
    forward, reverse = _ttt_orders(num_segments, text_len, hw, segments)

    n_text = num_segments * text_len
    ttt_table = None
    if ttt_head_dim is not None and ttt_rope != "none":
        # frame, row and column of every video token on the uncropped grid; text tokens get none
        if ttt_rope == "global":
            cos, sin = _rope_3d(ttt_head_dim, grid, num_frames, ((0, 0), grid))
        else:  # frame 0's table for every frame: the temporal part of the rotation is the identity
            cos, sin = (t.repeat(num_frames, 1) for t in _rope_3d(ttt_head_dim, grid, 1, ((0, 0), grid)))
        ttt_table = (torch.cat([torch.ones(n_text, ttt_head_dim), cos]),
                     torch.cat([torch.zeros(n_text, ttt_head_dim), sin]))

    def dev(t):
        return None if t is None else t.to(device)

    def dev_pair(pair):
        return None if pair is None else tuple(t.to(device) for t in pair)

    lengths = tuple(text_len + len(seg) * hw for seg in segments)  # each segment's run in the forward order

    def token_order(index: torch.Tensor, segment_lengths: tuple[int, ...]) -> TokenOrder:
        rope = None if ttt_table is None else (ttt_table[0][index], ttt_table[1][index])
        return TokenOrder(dev(index), dev(torch.argsort(index)), dev_pair(rope), n_text, grid=tuple(grid),
                          segment_lengths=segment_lengths)

    return SegmentLayout(
        num_segments=num_segments, text_len=text_len, tokens_per_frame=hw, num_frames=num_frames,
        window_frames=dev(frames), window_tokens=dev(tokens), window_valid=dev(valid_positions),
        windows_are_partition=partition,
        overlap_count=dev(count[:, None]), window_attn_mask=dev(attn_mask),
        window_rope=dev_pair(window_rope),
        forward=token_order(forward, lengths), reverse=token_order(reverse, lengths[::-1]),
        full_rope=dev_pair(full_rope),
        frame_segment=dev(frame_segments(num_segments, frames_first, frames_per_segment)),
    )
