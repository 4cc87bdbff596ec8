"""The TTT layer: projections, per-head norms, RoPE and the learned inner learning rate around the TTT op.

Design: docs/design.md, "The TTT layer". x (B, L, width) → [optional: video tokens + a depthwise spatial convolution
of their frame, `neighbours`] → wq/wk/wv → heads → L2-normalised q, k → 3-D RoPE
(given as tables; identity on text) → target v' = LN_h(v - k) + k → eta = base_lr * sigmoid(x . w_h + b_h) /
(head_dim * m), 0 on masked tokens → TTT op → post-LayerNorm → wo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from kernels import ttt_linear, ttt_mlp
from kernels.common import per_head_layer_norm

TTT_TYPES = ("mlp", "linear")
DEFAULT_MINI_BATCH = {"mlp": 64, "linear": 16}
DEFAULT_BASE_LR = {"mlp": 0.1, "linear": 1.0}


class TTTLayer(nn.Module):
    """TTT-MLP / TTT-Linear sequence layer (the gates live in the block that uses it).

    Args:
        width: model width W. num_heads, head_dim: H x D of the TTT heads (need not equal W).
        ttt_type: "mlp" (f(x) = gelu_tanh(x W1 + b1) W2 + b2, hidden 4D) or "linear" (f(x) = x W + b).
        mini_batch_size: m, tokens per inner gradient step (default 64 for MLP, 16 for Linear).
        base_lr: inner learning rate scale (default 0.1 for MLP, 1.0 for Linear).
        backend: the op backend, "auto" | "torch" | "triton" | "naive".
        checkpoint_group: mini-batches per activation checkpoint inside the op.
        conv: 0, or an odd kernel size k: the layer's input is first x + a depthwise k x k convolution of each frame's
            video tokens (`neighbours`), zero-initialised, so that a key, value and query see the token's neighbours
            on the grid; 0 (the design's) reads and writes token by token.
    """

    def __init__(self, width: int, num_heads: int, head_dim: int, ttt_type: str = "mlp",
                 mini_batch_size: int | None = None, base_lr: float | None = None, backend: str = "auto",
                 checkpoint_group: int = 4, conv: int = 0):
        super().__init__()
        if ttt_type not in TTT_TYPES:
            raise ValueError(f"ttt_type must be one of {TTT_TYPES}, got {ttt_type!r}")
        if not isinstance(conv, int) or isinstance(conv, bool) or conv < 0 or (conv and conv % 2 == 0):
            raise ValueError(f"ttt_conv must be 0 (none) or an odd kernel size (1, 3, 5, ...), got {conv!r}")
        self.ttt_type, self.num_heads, self.head_dim = ttt_type, num_heads, head_dim
        self.mini_batch_size = mini_batch_size or DEFAULT_MINI_BATCH[ttt_type]
        self.base_lr = DEFAULT_BASE_LR[ttt_type] if base_lr is None else base_lr
        self.backend, self.checkpoint_group = backend, checkpoint_group
        inner = num_heads * head_dim
        self.wq, self.wk, self.wv = (nn.Linear(width, inner) for _ in range(3))
        self.wo = nn.Linear(inner, width)
        self.ln_weight = nn.Parameter(torch.ones(num_heads, head_dim))  # the op's per-head LN affine (shared by LN_h)
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.lr_weight = nn.Parameter(torch.empty(num_heads, width))  # w_h of the inner learning rate
        self.lr_bias = nn.Parameter(torch.zeros(num_heads))
        if ttt_type == "mlp":
            hidden = 4 * head_dim
            self.w1 = nn.Parameter(torch.empty(num_heads, head_dim, hidden))
            self.b1 = nn.Parameter(torch.zeros(num_heads, hidden))
            self.w2 = nn.Parameter(torch.empty(num_heads, hidden, head_dim))
            self.b2 = nn.Parameter(torch.zeros(num_heads, head_dim))
        else:
            self.w = nn.Parameter(torch.empty(num_heads, head_dim, head_dim))
            self.b = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.post_norm = nn.LayerNorm(inner, eps=1e-6)
        self.conv = nn.Conv2d(width, width, conv, padding=conv // 2, groups=width) if conv else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init of docs/design.md: weights ~ N(0, 0.02), biases 0, LN affine (1, 0)."""
        for name, p in self.named_parameters(recurse=False):
            if name == "ln_weight":
                nn.init.ones_(p)
            elif name in ("w1", "w2", "w", "lr_weight"):
                nn.init.normal_(p, std=0.02)
            else:  # b1, b2, b, ln_bias, lr_bias
                nn.init.zeros_(p)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.post_norm.reset_parameters()
        if self.conv is not None:  # zero: the layer starts as the token-by-token one
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)

    def neighbours(self, x: torch.Tensor, num_text: int, grid: tuple[int, int]) -> torch.Tensor:
        """x (B, N, W) in canonical order (num_text text tokens, then whole frames of grid (h, w) in raster order) ->
        the same with every video token + the depthwise convolution of its frame; text as it is. Identity when the
        layer has no convolution."""
        if self.conv is None:
            return x
        b, _, width = x.shape
        h, w = grid
        video = x[:, num_text:]
        frames = video.reshape(-1, h, w, width).permute(0, 3, 1, 2)  # (B*T, W, h, w)
        mixed = self.conv(frames).permute(0, 2, 3, 1).reshape(b, -1, width)
        return torch.cat([x[:, :num_text], video + mixed], dim=1)

    @property
    def inner_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.w1, self.b1, self.w2, self.b2) if self.ttt_type == "mlp" else (self.w, self.b)

    def inner_lr(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """eta (B, H, L) from x (B, L, W); 0 where token_mask (B, L) is False."""
        logits = torch.einsum("blw,hw->bhl", x, self.lr_weight.to(x.dtype)) + self.lr_bias.to(x.dtype)[None, :, None]
        eta = self.base_lr * torch.sigmoid(logits.float()) / (self.head_dim * self.mini_batch_size)
        if token_mask is not None:
            eta = eta * token_mask[:, None, :].to(eta.dtype)
        return eta

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, initial_state=None,
                return_state: bool = False, exchange=None):
        """x: (B, L, W); token_mask: (B, L) bool (False = never updates the state); rope: (cos, sin) each (L, D).

        exchange: context parallelism (models/context_parallel.py): x is this rank's chunk of the sequence, and
        `exchange.to_heads` / `exchange.to_sequence` move the op's inputs to (every token, this rank's heads) and its
        output back. Returns (B, L, W), and with return_state also the final inner state (leading B, fp32).
        """
        q, k, target, eta = self.prepare(x, token_mask, rope)
        heads = slice(None)
        if exchange is not None:
            q, k, target, eta, heads = exchange.to_heads(q, k, target, eta)
        result = self.scan(q, k, target, eta, heads, initial_state=initial_state, return_state=return_state)
        out, state = result if return_state else (result, None)
        if exchange is not None:
            out = exchange.to_sequence(out)
        out = self.project_out(out)
        return (out, state) if return_state else out

    def forward_apart(self, x: torch.Tensor, runs: list[slice], token_mask: torch.Tensor | None = None,
                      rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Every run of the sequence read alone, from the initial state: the same as `forward` on each `x[:, run]`
        (with its mask and RoPE rows), concatenated. x: (B, L, W); runs: consecutive slices covering [0, L);
        token_mask (B, L); rope: (cos, sin) each (L, D). Returns (B, L, W).

        prepare and project_out read token by token, so they run once over the whole sequence; the runs of one
        length go through the op together as one batch (B * runs, H, length, D), so a sequence of n equal
        segments costs one scan of a segment's length instead of n."""
        starts = [0] + [run.stop for run in runs[:-1]]
        assert [run.start for run in runs] == starts and runs[-1].stop == x.shape[1], \
            f"runs must tile [0, {x.shape[1]}) in order, got {runs}"
        q, k, target, eta = self.prepare(x, token_mask, rope)  # (B, H, L, D) x 3, (B, H, L)
        out = torch.empty_like(q)
        by_length: dict[int, list[slice]] = {}
        for run in runs:
            by_length.setdefault(run.stop - run.start, []).append(run)
        for group in by_length.values():
            # (B, H, L, ...) -> (runs * B, H, length, ...)
            scanned = self.scan(*(torch.cat([t[:, :, run] for run in group], dim=0) for t in (q, k, target, eta)))
            for run, part in zip(group, scanned.chunk(len(group), dim=0)):
                out[:, :, run] = part
        return self.project_out(out)

    def prepare(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """Token-wise half before the op: x (B, L, W) -> q, k, target (B, H, L, D) and eta (B, H, L).

        Every output depends on its own token only, so a context-parallel rank runs this on its tokens alone."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) -> (B, H, L, D)
            return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = F.normalize(heads(self.wq(x)), dim=-1)
        k = F.normalize(heads(self.wk(x)), dim=-1)
        v = heads(self.wv(x))
        if rope is not None:
            q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        # normalised reconstruction target: the op sees v' - k = LN_h(v - k)
        target = k + per_head_layer_norm(v - k, self.ln_weight, self.ln_bias).to(k.dtype)
        return q, k, target, self.inner_lr(x, token_mask)

    def scan(self, q: torch.Tensor, k: torch.Tensor, target: torch.Tensor, eta: torch.Tensor,
             heads: slice = slice(None), initial_state=None, return_state: bool = False):
        """The TTT op over the whole sequence for the heads `heads` (all by default): q, k, target (B, h, L, D),
        eta (B, h, L) -> out (B, h, L, D) (and the final state with return_state)."""
        weights = tuple(w[heads] for w in (*self.inner_weights, self.ln_weight, self.ln_bias))
        op = ttt_mlp if self.ttt_type == "mlp" else ttt_linear
        return op(q, k, target, eta, *weights, mini_batch_size=self.mini_batch_size, initial_state=initial_state,
                  return_state=return_state, checkpoint_group=self.checkpoint_group, backend=self.backend)

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Token-wise half after the op: out (B, H, L, D) -> post-LayerNorm -> wo -> (B, L, W)."""
        b, _, length, _ = out.shape
        return self.wo(self.post_norm(out.transpose(1, 2).reshape(b, length, -1)))

    def extra_repr(self) -> str:
        return (f"ttt_type={self.ttt_type}, heads={self.num_heads}x{self.head_dim}, "
                f"mini_batch_size={self.mini_batch_size}, base_lr={self.base_lr}, backend={self.backend!r}")


def check_rope_head_dim(head_dim: int) -> None:
    """diffusers' 3-D RoPE splits D as D/4 (t), 3D/8 (h), 3D/8 (w), each even."""
    if head_dim % 16:
        raise ValueError(f"TTT head_dim must be a multiple of 16 for 3-D RoPE, got {head_dim}")


