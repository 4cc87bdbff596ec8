"""CogVideoX with gated, bidirectional TTT layers and segment-local attention.

Design: docs/design.md, "One transformer block with TTT". Every pretrained module of diffusers'
CogVideoXTransformer3DModel is kept with its weights and state-dict names; each block gains one TTT layer and four
gates, and the model gains a scene-boundary embedding. With all gates at 0 and one segment the model is exactly the
stock CogVideoX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import CogVideoXTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.hooks import FasterCacheConfig
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.utils import apply_lora_scale
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.checkpoint import checkpoint

from .context_parallel import ContextParallel, check_heads
from .layout import TTT_ROPES, SegmentLayout, TokenOrder, num_latent_frames, segment_layout
from .segment_conditioning import ada_layer_norm, gated, layer_norm_zero, time_embedding
from .ttt_layer import TTT_TYPES, TTTLayer, check_rope_head_dim

# the arguments TTT adds to CogVideoX's; their types and defaults are the model's signature (`ttt_config_fields`)
TTT_CONFIG_KEYS = ("ttt_type", "ttt_num_heads", "ttt_head_dim", "ttt_mini_batch_size", "ttt_base_lr", "ttt_backend",
                   "ttt_checkpoint_group", "gate_init", "latent_frames_first", "latent_frames_per_segment",
                   "overlap_frames", "checkpoint_ttt", "attention_window", "ttt_rope", "ttt_conv")
TRAINABLE_MODES = ("full", "ttt", "ttt+attn", "lora")  # set_trainable's modes
ATTENTION_WINDOWS = ("segment", "full")
# the transformer's prediction without memory (`without_memory`): every segment's TTT apart (TTT within a segment,
# nothing carried between segments) or the TTT layers skipped (segment-local attention alone)
MEMORY_BASELINES = ("segments_apart", "no_ttt")
_ATTN_TRAINABLE = ("attn1.to_q.", "attn1.to_k.", "attn1.to_v.", "attn1.to_out.0.", "attn1.norm_q.", "attn1.norm_k.")


class CogVideoXTTTBlock(CogVideoXBlock):
    """A CogVideoXBlock whose attention runs inside segment windows, followed by gated TTT over the whole sequence.

    X' = attn1(norm1(X)) per window;  Z = X' + tanh(a) * TTT(interleave(X'));  Z' = Z + tanh(b) * TTT(reverse(Z));
    Y = X + gate_msa * Z';  then norm2 + ff exactly as in CogVideoXBlock.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, time_embed_dim: int,
                 ttt_layer: TTTLayer | None, gate_init: float, checkpoint_ttt: bool = False,
                 full_attention: bool = False, **block_kwargs):
        super().__init__(dim, num_attention_heads, attention_head_dim, time_embed_dim, **block_kwargs)
        self.ttt = ttt_layer  # None: local attention only (the baseline without TTT)
        self.gate_init, self.checkpoint_ttt, self.full_attention = gate_init, checkpoint_ttt, full_attention
        self.ttt_skipped = False  # set by CogVideoXTTTTransformer3DModel.ttt_skipped(): the block runs without TTT
        self.ttt_segments_apart = False  # set by ..._segments_apart(): every segment's TTT from the initial state
        if ttt_layer is not None:
            self.gate_forward_text = nn.Parameter(torch.full((dim,), float(gate_init)))
            self.gate_forward_video = nn.Parameter(torch.full((dim,), float(gate_init)))
            self.gate_reverse_text = nn.Parameter(torch.full((dim,), float(gate_init)))
            self.gate_reverse_video = nn.Parameter(torch.full((dim,), float(gate_init)))

    def reset_added_parameters(self) -> None:
        if self.ttt is None:
            return
        self.ttt.reset_parameters()
        for gate in (self.gate_forward_text, self.gate_forward_video, self.gate_reverse_text, self.gate_reverse_video):
            nn.init.constant_(gate, self.gate_init)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                layout: SegmentLayout, token_mask: torch.Tensor | None = None,
                attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: (B, T*hw, W) video; encoder_hidden_states: (B, n*Lt, W) text of all segments;
        temb: (B, D_t), or (B, n, D_t) one per segment (models/segment_conditioning.py);
        token_mask: (B, n*Lt + T*hw) canonical, False = never updates the TTT state."""
        batch, n_text = hidden_states.shape[0], encoder_hidden_states.shape[1]
        width = hidden_states.shape[-1]

        norm_video, norm_text, gate_msa, enc_gate_msa = layer_norm_zero(
            self.norm1, hidden_states, encoder_hidden_states, temb, layout)

        # 1. segment-local attention: every window of every sample in ONE batched call
        if self.full_attention:  # the quadratic baseline: one window over all texts and all frames
            attn_video, attn_text = self.attn1(hidden_states=norm_video, encoder_hidden_states=norm_text,
                                               image_rotary_emb=layout.full_rope, **(attention_kwargs or {}))
            x = torch.cat([attn_text, attn_video], dim=1)
        else:
            mask = layout.window_attn_mask
            if mask is not None:
                mask = mask.to(norm_video.dtype).repeat(batch, 1, 1)  # (B*n, 1, Lt + Fw*hw)
            attn_video, attn_text = self.attn1(
                hidden_states=layout.to_windows(norm_video),
                encoder_hidden_states=norm_text.reshape(-1, layout.text_len, width),
                image_rotary_emb=layout.window_rope,
                attention_mask=mask,
                **(attention_kwargs or {}),
            )
            x = torch.cat([attn_text.reshape(batch, n_text, width), layout.from_windows(attn_video)], dim=1)

        # 2. gated TTT over the interleaved sequence, forward then reverse (the same TTT module)
        if self.ttt is not None and not self.ttt_skipped:
            x = self._gated_ttt(x, layout.forward, token_mask, self.gate_forward_text, self.gate_forward_video)
            x = self._gated_ttt(x, layout.reverse, token_mask, self.gate_reverse_text, self.gate_reverse_video)

        hidden_states = hidden_states + gated(gate_msa, x[:, n_text:])
        encoder_hidden_states = encoder_hidden_states + gated(enc_gate_msa, x[:, :n_text])

        # 3. feed-forward, as in CogVideoXBlock
        norm_video, norm_text, gate_ff, enc_gate_ff = layer_norm_zero(
            self.norm2, hidden_states, encoder_hidden_states, temb, layout)
        ff_output = self.ff(torch.cat([norm_text, norm_video], dim=1))
        hidden_states = hidden_states + gated(gate_ff, ff_output[:, n_text:])
        encoder_hidden_states = encoder_hidden_states + gated(enc_gate_ff, ff_output[:, :n_text])
        return hidden_states, encoder_hidden_states

    def _gated_ttt(self, x: torch.Tensor, order: TokenOrder, token_mask: torch.Tensor | None,
                   gate_text: torch.Tensor, gate_video: torch.Tensor) -> torch.Tensor:
        """x + tanh(gate) * TTT(x in `order`), back in canonical order. x: (B, N, W) canonical; token_mask (B, N).
        Under context parallelism x is the rank's part and `order.exchange` spreads the scan over the ranks."""
        mask = None if token_mask is None else order.gather(token_mask)
        inputs = order.gather(self.ttt.neighbours(x, order.num_text, order.grid))
        if self.ttt_segments_apart:  # each segment's run alone: TTT within it, nothing carried from another
            # (under context parallelism a rank holds whole segments, so nothing moves between ranks)
            y = self.ttt.forward_apart(inputs, order.segment_runs(), mask, order.rope)
        elif self.checkpoint_ttt and torch.is_grad_enabled():
            y = checkpoint(self.ttt, inputs, mask, order.rope, use_reentrant=False, exchange=order.exchange)
        else:
            y = self.ttt(inputs, mask, order.rope, exchange=order.exchange)
        y = order.scatter(y)
        n_text = order.num_text
        return torch.cat([x[:, :n_text] + torch.tanh(gate_text) * y[:, :n_text],
                          x[:, n_text:] + torch.tanh(gate_video) * y[:, n_text:]], dim=1)


class CogVideoXTTTTransformer3DModel(CogVideoXTransformer3DModel):
    """CogVideoXTransformer3DModel + gated bidirectional TTT layers over n segments of 3 s.

    TTT arguments (the base arguments are CogVideoX's own):
        ttt_type: "mlp" or "linear". ttt_num_heads / ttt_head_dim: default to the attention's.
        ttt_mini_batch_size, ttt_base_lr: default 64 / 0.1 (MLP), 16 / 1.0 (Linear).
        ttt_backend: "auto" | "torch" | "triton" | "naive". ttt_checkpoint_group: mini-batches per checkpoint.
        gate_init: initial alpha of the four gates per block (tanh(0.1) ~ 0.0997); 0 reproduces the base model.
        latent_frames_first, latent_frames_per_segment: 13 and 12 for CogVideoX (1 + 48 frames, then 48 per 3 s).
        overlap_frames: 1 puts the last frame of segment i-1 in segment i's attention window (averaged), 0 does not.
        checkpoint_ttt: activation checkpointing around each TTT call inside a block.
        ttt_rope: "global" (the design's: each video token's frame, row and column), "spatial" (row and column only)
            or "none" (keys and queries meet by content alone); docs/results.md, "What memory carries of a look".
        ttt_conv: 0 (the design's), or an odd k: TTT's input is x + a zero-initialised depthwise k x k convolution
            of each frame's video tokens, so its keys, values and queries see a token's neighbours.
    Baselines for the long-range benchmark: ttt_type="none" (segment-local attention only) and
    attention_window="full" (one attention window over every text and frame: quadratic in length).
    """

    _no_split_modules = ["CogVideoXTTTBlock", "CogVideoXPatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: int | None = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: int | None = None,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: int | None = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
        ttt_type: str = "mlp",
        ttt_num_heads: int | None = None,
        ttt_head_dim: int | None = None,
        ttt_mini_batch_size: int | None = None,
        ttt_base_lr: float | None = None,
        ttt_backend: str = "auto",
        ttt_checkpoint_group: int = 4,
        gate_init: float = 0.1,
        latent_frames_first: int = 13,
        latent_frames_per_segment: int = 12,
        overlap_frames: int = 1,
        checkpoint_ttt: bool = False,
        attention_window: str = "segment",
        ttt_rope: str = "global",
        ttt_conv: int = 0,
    ):
        if patch_size_t is not None:
            raise ValueError(
                "CogVideoX 1.5 checkpoints (patch_size_t=2) are not supported: their temporal patches pair latent "
                "frames, so a 13-frame first segment and 12-frame segments do not fall on patch boundaries")
        if ttt_type not in (*TTT_TYPES, "none"):
            raise ValueError(f"ttt_type must be one of {(*TTT_TYPES, 'none')}, got {ttt_type!r}")
        if attention_window not in ATTENTION_WINDOWS:
            raise ValueError(f"attention_window must be one of {ATTENTION_WINDOWS}, got {attention_window!r}")
        if ttt_rope not in TTT_ROPES:
            raise ValueError(f"ttt_rope must be one of {TTT_ROPES}, got {ttt_rope!r}")
        if overlap_frames not in (0, 1):
            raise ValueError(f"overlap_frames must be 0 or 1, got {overlap_frames}")
        if latent_frames_first < 1 or latent_frames_per_segment < 1:
            raise ValueError("latent_frames_first and latent_frames_per_segment must be >= 1, got "
                             f"{latent_frames_first} and {latent_frames_per_segment}")
        window_frames = max(latent_frames_first, latent_frames_per_segment + overlap_frames)
        if use_learned_positional_embeddings and (sample_frames - 1) // temporal_compression_ratio + 1 != window_frames:
            raise ValueError(
                f"learned positional embeddings are tied to {(sample_frames - 1) // temporal_compression_ratio + 1} "
                f"latent frames but the attention windows hold {window_frames}; choose latent_frames_first / "
                "latent_frames_per_segment / overlap_frames to match")
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=out_channels, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
            time_embed_dim=time_embed_dim, ofs_embed_dim=ofs_embed_dim, text_embed_dim=text_embed_dim,
            num_layers=num_layers, dropout=dropout, attention_bias=attention_bias, sample_width=sample_width,
            sample_height=sample_height, sample_frames=sample_frames, patch_size=patch_size, patch_size_t=patch_size_t,
            temporal_compression_ratio=temporal_compression_ratio, max_text_seq_length=max_text_seq_length,
            activation_fn=activation_fn, timestep_activation_fn=timestep_activation_fn,
            norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=use_rotary_positional_embeddings,
            use_learned_positional_embeddings=use_learned_positional_embeddings, patch_bias=patch_bias,
        )
        inner_dim = num_attention_heads * attention_head_dim
        heads = ttt_num_heads or num_attention_heads
        head_dim = ttt_head_dim or attention_head_dim
        if ttt_type != "none":
            check_rope_head_dim(head_dim)
        self.transformer_blocks = nn.ModuleList([
            CogVideoXTTTBlock(
                inner_dim, num_attention_heads, attention_head_dim, time_embed_dim,
                ttt_layer=None if ttt_type == "none" else TTTLayer(
                    inner_dim, heads, head_dim, ttt_type, ttt_mini_batch_size, ttt_base_lr, ttt_backend,
                    ttt_checkpoint_group, ttt_conv),
                gate_init=gate_init, checkpoint_ttt=checkpoint_ttt, full_attention=attention_window == "full",
                dropout=dropout, activation_fn=activation_fn,
                attention_bias=attention_bias, norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        ])
        # added to the text tokens of a segment that opens a new scene; 0 at init keeps the base model exact
        self.scene_embedding = nn.Parameter(torch.zeros(inner_dim))
        self.context_parallel: ContextParallel | None = None

    def enable_context_parallel(self, mesh) -> None:
        """Split every sample's segments over the ranks of `mesh` (a 1-D DeviceMesh, e.g. mesh["cp"]); None undoes
        it. Inputs stay whole on every rank and the output is gathered; sum the parameter gradients over the group
        (`self.context_parallel.reduce_gradients`). See models/context_parallel.py."""
        if mesh is None:
            self.context_parallel = None
            return
        if self.config.attention_window != "segment":
            raise ValueError("context parallelism splits segment-local attention; attention_window='full' needs "
                             "every frame on one rank")
        if self.config.ttt_type != "none":
            check_heads(self.config.ttt_num_heads or self.config.num_attention_heads, mesh.size())
        self.context_parallel = ContextParallel(mesh)

    # building from a pretrained CogVideoX

    @classmethod
    def from_base(cls, base: CogVideoXTransformer3DModel | str | os.PathLike, *, subfolder: str | None = None,
                  torch_dtype: torch.dtype | None = None, adapter: str | os.PathLike | None = None,
                  **ttt_config) -> CogVideoXTTTTransformer3DModel:
        """Insert TTT into a pretrained CogVideoX: an object, a local diffusers directory or a hub id
        (e.g. "THUDM/CogVideoX-5b" with subfolder="transformer"). The base weights are kept as they are; the
        added weights are initialised (or read from `adapter`, a file written by `save_adapter`). A base object's
        tensors are shared, not copied (no second 5B copy in memory): pass a deep copy to keep the base untouched."""
        unknown = sorted(set(ttt_config) - set(TTT_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown TTT config keys {unknown}; known: {list(TTT_CONFIG_KEYS)}")
        if isinstance(base, (str, os.PathLike)):
            base = CogVideoXTransformer3DModel.from_pretrained(base, subfolder=subfolder, torch_dtype=torch_dtype)
        elif not isinstance(base, CogVideoXTransformer3DModel):
            raise TypeError(f"base must be a CogVideoXTransformer3DModel, a directory or a hub id, got {type(base)}")
        if isinstance(base, cls):
            raise ValueError("base already has TTT layers; load it with from_pretrained instead")
        config = {k: v for k, v in base.config.items() if not k.startswith("_")}
        with init_empty_weights():
            model = cls(**config, **ttt_config)
        state = base.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        added = set(model.added_parameter_names())
        not_loaded = sorted(set(missing) - added)
        if unexpected or not_loaded:
            raise ValueError(f"base weights do not fit: unexpected {unexpected}, missing {not_loaded}")
        param = next(iter(state.values()))
        model._materialize_added(param.device, param.dtype)
        if adapter is not None:
            model.load_adapter(adapter)
        return model.train(base.training)

    def _materialize_added(self, device: torch.device, dtype: torch.dtype) -> None:
        """Give the added parameters (left on the meta device by init_empty_weights) real storage and init."""
        for name in self.added_parameter_names():
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(torch.zeros(old.shape, device=device, dtype=dtype)))
        for block in self.transformer_blocks:
            block.reset_added_parameters()
        nn.init.zeros_(self.scene_embedding)

    # parameter groups

    def added_parameter_names(self) -> list[str]:
        """Names of the parameters TTT adds to CogVideoX (TTT layers, gates, scene embedding)."""
        return [n for n, _ in self.named_parameters()
                if ".ttt." in n or ".gate_forward_" in n or ".gate_reverse_" in n or n == "scene_embedding"]

    def set_trainable(self, mode: str) -> list[str]:
        """requires_grad by mode: "ttt" (TTT + gates + scene embedding), "ttt+attn" (+ attention q/k/v/o and
        qk-norms), "lora" (TTT + PEFT LoRA weights added with `add_adapter`), "full". Returns the trainable names."""
        if mode not in TRAINABLE_MODES:
            raise ValueError(f"trainable mode must be one of {TRAINABLE_MODES}, got {mode!r}")
        added = set(self.added_parameter_names())
        names = []
        for name, p in self.named_parameters():
            train = (mode == "full" or name in added
                     or (mode == "ttt+attn" and any(k in name for k in _ATTN_TRAINABLE))
                     or (mode == "lora" and "lora_" in name))
            p.requires_grad_(train)
            if train:
                names.append(name)
        if mode == "lora" and not any("lora_" in n for n in names):
            raise ValueError('trainable mode "lora" needs LoRA layers: call add_adapter(LoraConfig(...)) first')
        return names

    # diffusers' cache hooks

    def enable_cache(self, config) -> None:
        """diffusers' `CacheMixin.enable_cache`, made to fit this model (docs/sampling.md, "Faster sampling").

        The block-level hooks (FirstBlockCacheConfig, FasterCache's) look a block class up in diffusers'
        TransformerBlockRegistry by exact class: `CogVideoXTTTBlock` returns (video, text) like CogVideoXBlock and is
        registered so. FasterCache halves the batch of the unconditional/conditional inputs it knows by name;
        `scene_start` (B, n) is added to them. Attention-level hooks (PyramidAttentionBroadcastConfig) need nothing.
        """
        register_block_for_cache_hooks()
        if isinstance(config, FasterCacheConfig):
            names = tuple(config._unconditional_conditional_input_kwargs_identifiers)
            if "scene_start" not in names:
                names = (*names, "scene_start")
                config = dataclasses.replace(config, _unconditional_conditional_input_kwargs_identifiers=names)
        super().enable_cache(config)

    # adapters: the added weights alone

    def ttt_config(self) -> dict:
        return {k: self.config[k] for k in TTT_CONFIG_KEYS}

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Write the added weights (safetensors) with the TTT config in the metadata; atomic: the bytes go to a
        temporary name in the same folder, then a rename (models/ stays below pipeline/, whose atomic.py does this
        for the rest of the project)."""
        tensors = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters()
                   if n in set(self.added_parameter_names())}
        data = save(tensors, metadata={"ttt_config": json.dumps(self.ttt_config())})
        path = os.fspath(path)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as file:
                file.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Read the added weights written by `save_adapter`; every added weight must be present and fit."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TTT adapter file not found: {path}")
        tensors = load_file(os.fspath(path))
        expected = set(self.added_parameter_names())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"{path}: adapter does not fit this model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); was it saved from a model with the same TTT config?")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(params[name].shape)}")
                params[name].copy_(tensor)

    # forward

    def num_latent_frames(self, num_segments: int) -> int:
        """Latent frames of n segments: latent_frames_first + (n - 1) * latent_frames_per_segment."""
        return num_latent_frames(num_segments, self.config.latent_frames_first, self.config.latent_frames_per_segment)

    @property
    def has_ttt(self) -> bool:
        """True when the blocks have TTT layers (False for the local-attention baseline, ttt_type "none")."""
        return any(block.ttt is not None for block in self.transformer_blocks)

    @contextlib.contextmanager
    def _ttt_blocks_flagged(self, flag: str) -> Iterator[None]:
        """Sets the boolean `flag` on every block with TTT layers; cleared on exit (also by an exception)."""
        blocks = [block for block in self.transformer_blocks if block.ttt is not None]
        for block in blocks:
            setattr(block, flag, True)
        try:
            yield
        finally:
            for block in blocks:
                setattr(block, flag, False)

    def ttt_skipped(self) -> contextlib.AbstractContextManager:
        """Inside it, every block skips its TTT layers: the prediction of segment-local attention alone, without what
        TTT carries between segments (memory guidance's "no_ttt" branch, pipeline_ttt_video.py). Restored on exit."""
        return self._ttt_blocks_flagged("ttt_skipped")

    def ttt_segments_apart(self) -> contextlib.AbstractContextManager:
        """Inside it, every block's TTT layers read each segment alone, from their initial state: what TTT does within
        a segment stays, what it carries between segments is gone (memory guidance's "segments_apart" branch).
        Restored on exit."""
        return self._ttt_blocks_flagged("ttt_segments_apart")

    def without_memory(self, baseline: str) -> contextlib.AbstractContextManager:
        """`ttt_segments_apart()` for "segments_apart", `ttt_skipped()` for "no_ttt" (MEMORY_BASELINES)."""
        if baseline not in MEMORY_BASELINES:
            raise ValueError(f"expected one of {', '.join(MEMORY_BASELINES)}, got {baseline!r}")
        return self.ttt_segments_apart() if baseline == "segments_apart" else self.ttt_skipped()

    def segment_layout(self, num_segments: int, height: int, width: int, device: torch.device) -> SegmentLayout:
        """The (cached) layout for n segments on a latent grid of height x width."""
        c, p = self.config, self.config.patch_size
        return segment_layout(
            num_segments, c.latent_frames_first, c.latent_frames_per_segment, c.overlap_frames, c.max_text_seq_length,
            (height // p, width // p), (c.sample_height // p, c.sample_width // p),
            c.attention_head_dim if c.use_rotary_positional_embeddings else None,
            None if c.ttt_type == "none" else (c.ttt_head_dim or c.attention_head_dim), str(device),
            c.attention_window == "full", c.ttt_rope,
        )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: int | float | torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        scene_start: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        ofs: int | float | torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Denoising prediction for n segments.

        hidden_states: (B, T, C, h, w) latents with T = num_latent_frames(n);
        encoder_hidden_states: (B, n, L_text, D_text) per-segment text embeddings, L_text = max_text_seq_length;
        timestep: (B,) or scalar, or (B, n): one noise level per segment (t = 0: clean context; docs/model.md,
        "Per-segment noise levels"); equal levels give the (B,) result;
        encoder_attention_mask: (B, n, L_text), 0 on text padding (those tokens do not update the TTT state);
        scene_start: (B, n) bool, True where a segment opens a new scene.
        Returns sample (B, T, C, h, w).
        """
        batch, frames, _, height, width = hidden_states.shape
        if encoder_hidden_states.dim() != 4:
            raise ValueError("encoder_hidden_states must be (B, n_segments, L_text, D_text), got shape "
                             f"{tuple(encoder_hidden_states.shape)}")
        n, text_len = encoder_hidden_states.shape[1:3]
        if frames != self.num_latent_frames(n):
            raise ValueError(f"{n} segments need {self.num_latent_frames(n)} latent frames, got {frames}")
        if text_len != self.config.max_text_seq_length:
            raise ValueError(f"text length must be max_text_seq_length={self.config.max_text_seq_length}, "
                             f"got {text_len}")
        per_segment = isinstance(timestep, torch.Tensor) and timestep.dim() == 2
        if per_segment and tuple(timestep.shape) != (batch, n):
            raise ValueError(f"per-segment timestep must be (B, n_segments) = {(batch, n)}, "
                             f"got {tuple(timestep.shape)}")
        layout = self.segment_layout(n, height, width, hidden_states.device)
        if self.context_parallel is not None:  # this rank's segments only; inputs stay whole
            layout, encoder_hidden_states, encoder_attention_mask, scene_start, segment_timestep = \
                self.context_parallel.shard(layout, encoder_hidden_states, encoder_attention_mask, scene_start,
                                            timestep if per_segment else None)
            timestep = segment_timestep if per_segment else timestep
            n = layout.num_segments

        # 1. time embedding: (B, D_t), or (B, n, D_t) per segment
        emb = time_embedding(self, timestep, hidden_states.dtype, timestep_cond, ofs)

        # 2. patch embedding per window (text of segment i + its frames), then back to one sequence
        windows = hidden_states.index_select(1, layout.window_frames.flatten())  # (B, n*Fw, C, h, w)
        windows = windows.reshape(batch * n, layout.window_frames_count, *windows.shape[2:])
        tokens = self.embedding_dropout(self.patch_embed(encoder_hidden_states.flatten(0, 1), windows))
        text = tokens[:, :text_len].unflatten(0, (batch, n))  # (B, n, Lt, W)
        if scene_start is not None:
            text = text + scene_start[:, :, None, None].to(text.dtype) * self.scene_embedding.to(text.dtype)
        text = text.flatten(1, 2)  # (B, n*Lt, W)
        video = layout.from_windows(tokens[:, text_len:])  # (B, T*hw, W)

        token_mask = None
        if encoder_attention_mask is not None:
            token_mask = torch.cat([encoder_attention_mask.reshape(batch, -1).bool(),
                                    torch.ones(batch, video.shape[1], dtype=torch.bool, device=video.device)], dim=1)

        # 3. blocks
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                video, text = self._gradient_checkpointing_func(block, video, text, emb, layout, token_mask,
                                                                attention_kwargs)
            else:
                video, text = block(video, text, emb, layout, token_mask, attention_kwargs)

        # 4. output, as in CogVideoXTransformer3DModel
        video = self.proj_out(ada_layer_norm(self.norm_out, self.norm_final(video), emb, layout))
        p = self.config.patch_size
        output = video.reshape(batch, layout.num_frames, height // p, width // p, -1, p, p)
        output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        if self.context_parallel is not None:
            output = self.context_parallel.gather(output, layout)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def ttt_config_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, default) of every TTT argument, read from the model's signature: the one source of the TTT
    config (pipeline.training.config.TTTConfig is built from it)."""
    params = inspect.signature(CogVideoXTTTTransformer3DModel.__init__, eval_str=True).parameters
    return [(key, params[key].annotation, params[key].default) for key in TTT_CONFIG_KEYS]


def register_block_for_cache_hooks() -> None:
    """Registers `CogVideoXTTTBlock` with diffusers' cache hooks: forward(hidden_states, encoder_hidden_states, ...)
    returns (hidden_states, encoder_hidden_states), as CogVideoXBlock's. diffusers keeps this registry in a private
    module (hooks._helpers) and has no public way to add a block class; registering twice is harmless."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(CogVideoXTTTBlock, TransformerBlockMetadata(return_hidden_states_index=0,
                                                                                 return_encoder_hidden_states_index=1))
