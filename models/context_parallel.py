"""Context parallelism: one sample's sequence over the P ranks of a DeviceMesh dimension, split on segment boundaries.

Design: docs/design.md and docs/training.md, "Context parallelism". Rank r holds whole
segments (their text and their latent frames), a contiguous run of them; counts may differ by one (3 segments on 2
ranks: 2 + 1). Per block:
- norm1, norm2, feed-forward and gates are token-wise: no communication.
- segment-local attention: a rank's windows need the last frame of the previous rank's last segment (the overlap
  frame, overlap_frames = 1); it arrives by one small exchange, and the attention output for that frame goes back
  to its owner, where it is averaged as in the single-process `SegmentLayout.from_windows`.
- TTT: the token-wise projections run on the rank's own tokens; an all-to-all turns (all heads, own tokens) into
  (H/P heads, every token), the unchanged op scans the whole interleaved sequence, and an all-to-all turns the
  result back. In the interleaved order the ranks' tokens are contiguous chunks in rank order; in the reverse order
  they are contiguous chunks in reverse rank order, so both directions use the same exchange with the chunks
  concatenated in the other order.
Every exchange is an `all_to_all_single` inside an autograd.Function whose backward is the inverse all-to-all, so
gradients flow between ranks; every rank calls every exchange (zero-size splits where it has nothing to send), which
keeps the collectives in step under activation checkpointing.

The model's inputs stay whole on every rank (latents and text embeddings are small next to the activations); each
rank embeds only its own segments, and the output is gathered so that every rank returns the whole prediction.
The gather assumes what follows is replicated (every rank computes the same loss or scheduler step): its backward
keeps the rank's own slice of the gradient without summing, and each rank's parameter gradients are then its part
of the total: sum them over the context-parallel group (`reduce_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .layout import SegmentLayout, TokenOrder, segment_layout


def split_segments(num_segments: int, world: int) -> list[range]:
    """Contiguous runs of whole segments, one per rank, the first num_segments % world ranks one segment longer."""
    if num_segments < world:
        raise ValueError(f"context parallelism over {world} ranks needs at least {world} segments, got {num_segments}")
    base, extra = divmod(num_segments, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (r < extra))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def check_heads(num_heads: int, world: int) -> None:
    """TTT heads are split over the group inside the TTT layer: H must be a multiple of P."""
    if num_heads % world:
        raise ValueError(f"context parallelism over {world} ranks splits the TTT heads between them: ttt_num_heads "
                         f"({num_heads}) must be divisible by {world}; choose a context-parallel size that divides it")


# collectives with gradients


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on flat tensors; backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


class _GatherReplicated(torch.autograd.Function):
    """Every rank's chunk (dim 1) to every rank. What follows is replicated, so backward keeps the own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lengths: list[int], rank: int, group) -> torch.Tensor:
        ctx.start, ctx.length = sum(lengths[:rank]), lengths[rank]
        row = x.numel() // x.shape[1]  # elements per position along dim 1 (the whole batch)
        x = x.transpose(0, 1).contiguous()  # (L_r, B, ...): chunks of dim 1 are contiguous
        out = x.new_empty(sum(lengths) * row)
        dist.all_to_all_single(out, x.flatten().repeat(len(lengths)), [n * row for n in lengths],
                               [x.numel()] * len(lengths), group=group)
        return out.view(sum(lengths), *x.shape[1:]).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(1, ctx.start, ctx.length), None, None, None


# the rank's part of a layout


@dataclass(frozen=True)
class ShardLayout:
    """The rank's part of a `SegmentLayout`, with the same interface for the block (duck-typed).

    Local canonical order: [text of the rank's segments, the rank's own latent frames]. With overlap frames the
    windows read [halo, own frames], the halo being the previous rank's last frame, which the rank's first window
    overlaps (on the first rank a slot no window reads).

    Attributes:
        full: the whole sequence's layout. segments: the rank's segments. frames: its own latent frames (global).
        num_segments, num_frames: local counts. text_len, tokens_per_frame: as in the whole layout.
        window_frames: (n_r, Fw) global latent frame of each window slot (for the patch embedding of whole inputs).
        window_tokens: (n_r*Fw*hw,) index into [halo, own frames] video tokens ([own frames] without overlap).
        window_valid: positions of real (non-padding) window tokens.
        overlap_count: (T_r*hw, 1) windows holding each own token, over the whole sequence.
        window_attn_mask, window_rope: the rank's rows of the whole layout's.
        forward, reverse: the rank's chunk of the interleaved / reverse order (local canonical indices, the chunk's
        RoPE rows), with the `HeadExchange` that spreads the TTT scan over the ranks.
        frame_counts: latent frames of every rank. group, rank, world: the process group.
        frame_segment: (T_r,) local segment of each own latent frame (per-segment noise levels).
    """

    full: SegmentLayout
    segments: range
    frames: range
    num_segments: int
    num_frames: int
    text_len: int
    tokens_per_frame: int
    window_frames: torch.Tensor
    window_tokens: torch.Tensor
    window_valid: torch.Tensor
    windows_are_partition: bool
    overlap_count: torch.Tensor
    window_attn_mask: torch.Tensor | None
    window_rope: tuple[torch.Tensor, torch.Tensor] | None
    forward: TokenOrder
    reverse: TokenOrder
    frame_counts: tuple[int, ...]
    group: object
    rank: int
    world: int
    frame_segment: torch.Tensor

    full_rope = None  # the full-attention baseline is not context-parallel

    @property
    def window_frames_count(self) -> int:
        return self.window_frames.shape[1]

    def _shift(self, x: torch.Tensor, to_next: bool) -> torch.Tensor:
        """x (B, hw, W) to rank r + 1 (to_next) or r - 1, around a ring; returns what arrived (B, hw, W).

        A ring rather than a line: every rank sends and receives, so every rank's graph holds the same exchanges and
        their backward exchanges run on every rank in the same order (a node that one rank never reaches in
        backward would leave the other waiting). What crosses the ends is never used: the first rank's halo slot is
        read by no window, and the zeros it sends back are added to the last rank's last frame."""
        size, p = x.numel(), self.world
        dest, src = ((self.rank + 1) % p, (self.rank - 1) % p) if to_next else ((self.rank - 1) % p,
                                                                                 (self.rank + 1) % p)
        in_splits = [size if r == dest else 0 for r in range(p)]
        out_splits = [size if r == src else 0 for r in range(p)]
        return _AllToAll.apply(x.flatten(), out_splits, in_splits, self.group).view_as(x)

    def to_windows(self, video: torch.Tensor) -> torch.Tensor:
        """Own video tokens (B, T_r*hw, W) -> windows (B*n_r, Fw*hw, W); the overlap frame comes from rank r - 1."""
        if not self.full.windows_are_partition:  # overlap frames: local video = [halo frame, own frames]
            video = torch.cat([self._shift(video[:, -self.tokens_per_frame:], to_next=True), video], dim=1)
        windows = video.index_select(1, self.window_tokens)
        return windows.reshape(video.shape[0] * self.num_segments, -1, video.shape[-1])

    def from_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Windows (B*n_r, Fw*hw, W) -> own video tokens (B, T_r*hw, W), overlap frames averaged over all windows
        (the halo frame's share is sent back to its owner)."""
        hw, width = self.tokens_per_frame, windows.shape[-1]
        flat = windows.reshape(-1, self.num_segments * windows.shape[1], width).index_select(1, self.window_valid)
        if self.full.windows_are_partition:
            return flat
        out = flat.new_zeros(flat.shape[0], (1 + self.num_frames) * hw, width)
        out = out.index_add(1, self.window_tokens.index_select(0, self.window_valid), flat)
        share = self._shift(out[:, :hw], to_next=False)  # the next rank's share of the own last frame
        out = torch.cat([out[:, hw:-hw], out[:, -hw:] + share], dim=1)
        return out / self.overlap_count.to(out.dtype)


@dataclass(frozen=True)
class HeadExchange:
    """The TTT layer's all-to-alls for one rank and one direction (`TokenOrder.exchange`, `TTTLayer.forward`).

    chunk_lengths: tokens of every rank, in rank order (the same in both directions); reverse: the order's chunks
    come in reverse rank order (the reverse TTT order).
    """

    chunk_lengths: tuple[int, ...]
    reverse: bool
    group: object
    rank: int
    world: int

    def to_heads(self, q, k, target, eta):
        """q, k, target (B, H, L_r, D), eta (B, H, L_r) of the rank's tokens -> the same for every token of the
        sequence and the rank's H/P heads, with the slice of the layer's heads they are."""
        d, per_rank = q.shape[-1], q.shape[1] // self.world
        qkt = self._sequence_to_heads(torch.cat([q, k, target], dim=-1))  # (B, H/P, L, 3D)
        eta = self._sequence_to_heads(eta.unsqueeze(-1)).squeeze(-1)  # (B, H/P, L), float32
        return (*qkt.split(d, dim=-1), eta, slice(self.rank * per_rank, (self.rank + 1) * per_rank))

    def to_sequence(self, out: torch.Tensor) -> torch.Tensor:
        """The op's output (B, H/P, L, D) -> the rank's tokens, all heads (B, H, L_r, D)."""
        b, hp, _, d = out.shape
        p, lengths = self.world, list(self.chunk_lengths)
        chunks = out.split(lengths[::-1] if self.reverse else lengths, dim=2)
        chunks = chunks[::-1] if self.reverse else chunks  # rank order
        send = torch.cat([c.flatten() for c in chunks])
        n = lengths[self.rank]
        received = _AllToAll.apply(send, [b * hp * n * d] * p, [c.numel() for c in chunks], self.group)
        return received.view(p, b, hp, n, d).transpose(0, 1).reshape(b, p * hp, n, d)

    def _sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L_r, D) own tokens, all heads -> (B, H/P, L, D) every token in the order, own heads."""
        b, h, length, d = x.shape
        p, hp = self.world, h // self.world
        send = x.reshape(b, p, hp, length, d).transpose(0, 1).flatten()  # chunk j: the heads of rank j
        sizes = [b * hp * n * d for n in self.chunk_lengths]
        received = _AllToAll.apply(send, sizes, [send.numel() // p] * p, self.group)
        chunks = [c.view(b, hp, n, d) for c, n in zip(received.split(sizes), self.chunk_lengths)]
        return torch.cat(chunks[::-1] if self.reverse else chunks, dim=2)


def shard_layout(layout: SegmentLayout, group, rank: int, world: int) -> ShardLayout:
    """The part of `layout` that rank `rank` of `world` holds."""
    segments = split_segments(layout.num_segments, world)
    mine = segments[rank]
    hw, lt, n = layout.tokens_per_frame, layout.text_len, layout.num_segments
    seg_frames = _segment_frame_ranges(layout)
    frames = range(seg_frames[mine.start].start, seg_frames[mine.stop - 1].stop)
    overlap = not layout.windows_are_partition

    # window tokens into the local [halo, own frames] video
    local_frame = torch.full((layout.num_frames,), -1, dtype=torch.long)
    local_frame[frames.start:frames.stop] = torch.arange(len(frames)) + int(overlap)  # after the halo slot
    if overlap and rank > 0:
        local_frame[frames.start - 1] = 0
    rows = layout.window_frames[mine.start:mine.stop].cpu()  # (n_r, Fw) global frames
    fw = rows.shape[1]
    valid_full = torch.zeros(n * fw * hw, dtype=torch.bool)
    valid_full[layout.window_valid.cpu()] = True
    valid = valid_full.view(n, fw * hw)[mine.start:mine.stop].flatten()
    slot_frames = local_frame[rows].clamp(min=0)  # padding slots (invalid) may name a frame of another rank
    assert bool((local_frame[rows].flatten().repeat_interleave(hw)[valid] >= 0).all()), "window outside the shard"
    tokens = (slot_frames[:, :, None] * hw + torch.arange(hw)).flatten()
    valid_positions = torch.nonzero(valid).squeeze(1)

    # the rank's chunk of the interleaved and reverse orders
    to_local = torch.full((n * lt + layout.num_frames * hw,), -1, dtype=torch.long)
    to_local[mine.start * lt:mine.stop * lt] = torch.arange(len(mine) * lt)
    own_video = n * lt + frames.start * hw + torch.arange(len(frames) * hw)
    to_local[own_video] = len(mine) * lt + torch.arange(len(frames) * hw)
    frame_counts = tuple(seg_frames[s.stop - 1].stop - seg_frames[s.start].start for s in segments)
    lengths = [len(s) * lt + f * hw for s, f in zip(segments, frame_counts)]
    f_start = sum(lengths[:rank])
    r_start = sum(lengths[rank + 1:])
    forward = to_local[layout.forward.index.cpu()[f_start:f_start + lengths[rank]]]
    reverse = to_local[layout.reverse.index.cpu()[r_start:r_start + lengths[rank]]]
    assert bool((forward >= 0).all() and (reverse >= 0).all()), "a rank's tokens are not contiguous in TTT order"

    device = layout.forward.index.device

    def token_order(whole: TokenOrder, index: torch.Tensor, start: int, reverse: bool) -> TokenOrder:
        rope = None if whole.rope is None else tuple(t[start:start + lengths[rank]] for t in whole.rope)
        own = layout.forward.segment_lengths[mine.start:mine.stop]  # this rank's segments, forward order
        return TokenOrder(index.to(device), torch.argsort(index).to(device), rope, len(mine) * lt,
                          HeadExchange(tuple(lengths), reverse, group, rank, world), whole.grid,
                          own[::-1] if reverse else own)

    mask = layout.window_attn_mask
    return ShardLayout(
        full=layout, segments=mine, frames=frames, num_segments=len(mine), num_frames=len(frames), text_len=lt,
        tokens_per_frame=hw, window_frames=layout.window_frames[mine.start:mine.stop],
        window_tokens=tokens.to(device), window_valid=valid_positions.to(device),
        windows_are_partition=layout.windows_are_partition,
        overlap_count=layout.overlap_count[frames.start * hw:frames.stop * hw],
        window_attn_mask=None if mask is None else mask[mine.start:mine.stop], window_rope=layout.window_rope,
        forward=token_order(layout.forward, forward, f_start, reverse=False),
        reverse=token_order(layout.reverse, reverse, r_start, reverse=True),
        frame_counts=frame_counts,
        group=group, rank=rank, world=world,
        frame_segment=layout.frame_segment[frames.start:frames.stop] - mine.start,
    )


def _segment_frame_ranges(layout: SegmentLayout) -> list[range]:
    """Own latent frames of each segment: the last frames of its window (the window may start with an overlap)."""
    ends = (layout.window_frames.max(dim=1).values + 1).tolist()
    starts = [0] + ends[:-1]
    return [range(a, b) for a, b in zip(starts, ends)]


class ContextParallel:
    """The context-parallel group of a model: `CogVideoXTTTTransformer3DModel.enable_context_parallel(mesh)`.

    mesh: a 1-D DeviceMesh, or the "cp" dimension of a larger one (e.g. mesh["cp"] of a ("dp", "cp") mesh).
    """

    def __init__(self, mesh: DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"context parallelism needs a 1-D mesh (e.g. mesh['cp']), got {mesh.ndim} dimensions")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank, self.world = mesh.get_local_rank(), mesh.size()
        self._shards: dict[int, ShardLayout] = {}

    def shard(self, layout: SegmentLayout, *per_segment: torch.Tensor | None):
        """The rank's `ShardLayout` of `layout`, and each per-segment input (B, n, ...) cut to the rank's segments
        (None stays None)."""
        key = id(layout)  # layouts are cached per shape (segment_layout's lru_cache), so are their shards
        shard = self._shards.get(key)
        if shard is None or shard.full is not layout:
            # a shard keeps its whole layout alive: keep no more than segment_layout's cache does
            while len(self._shards) >= segment_layout.cache_info().maxsize:
                del self._shards[next(iter(self._shards))]
            shard = self._shards[key] = shard_layout(layout, self.group, self.rank, self.world)
        segments = slice(shard.segments.start, shard.segments.stop)
        return shard, *(None if t is None else t[:, segments] for t in per_segment)

    def gather(self, output: torch.Tensor, shard: ShardLayout) -> torch.Tensor:
        """Own frames (B, T_r, ...) -> every frame (B, T, ...) on every rank (backward: the own slice)."""
        return _GatherReplicated.apply(output, list(shard.frame_counts), self.rank, self.group)

    def reduce_gradients(self, parameters) -> None:
        """Sum each parameter's gradient over the group: each rank holds its share of the total."""
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)

