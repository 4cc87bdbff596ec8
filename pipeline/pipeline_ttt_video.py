"""TTTVideoPipeline: a storyboard of n 3-second segments → one video, denoised jointly (docs/design.md).

Follows diffusers' CogVideoXPipeline (pipelines/cogvideo/pipeline_cogvideox.py): the same components, prompt
handling, latents, schedulers (DDIM and DPM), classifier-free guidance (constant or CogVideoX's dynamic schedule)
and VAE. What differs: the text of every segment is encoded separately and the transformer
(`models.CogVideoXTTTTransformer3DModel`) takes all segments at once — (B, n, L_text, D) text, (B, T, C, h, w)
latents with T = num_latent_frames(n) — and the VAE decodes in temporal windows with its causal conv cache carried
from window to window, so a minute of video never sits on the device as one float tensor and has no seams.

Load a saved pipeline with `TTTVideoPipeline.from_pretrained(directory)`, or with
`DiffusionPipeline.from_pretrained(directory, trust_remote_code=True)` (diffusers' remote-code route: the folder names
its pipeline file in model_index.json; see `save_pretrained`), or build one from a stock CogVideoX pipeline and a TTT
adapter with `TTTVideoPipeline.from_cogvideox(...)`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    DiffusionPipeline,
    FirstBlockCacheConfig,
    ModelMixin,  # noqa: F401  (looked up in this module when loading; see __init__)
    TaylorSeerCacheConfig,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import CogVideoXLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models import CogVideoXTTTTransformer3DModel
from models.layout import frame_segments
from models.transformer_ttt import MEMORY_BASELINES

from .atomic import atomic_write_text
from .code_bundle import BUNDLE_FILE, CLASS_NAME_ENTRY, CODE_FILE, CODE_FILE_TEXT, bundle_text

# model_index.json may name this text encoder (the toy default model does): diffusers resolves component classes only
# in modules already imported
from .packaged_text_encoder import PackagedTextEncoder  # noqa: F401
from .segment_context import SegmentContext, VideoInput, build_context, encode_video, latent_segments
from .storyboard import (
    DEFAULT_MAX_SEGMENTS,
    MEMORY_GUIDANCE_SEGMENTS,
    SEGMENT_SECONDS,
    Segment,
    Storyboard,
    StoryboardError,
    load_storyboard,
)
from .text_encoding import encode_text
from .vae_decode import decode_windows, frame_batches

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
CFG_MODES = ("batched", "sequential")
DEFAULT_GUIDANCE_SCALE = 6.0  # CogVideoX's; a pipeline's config may keep another (its guidance_scale)


@dataclass
class TTTVideoPipelineOutput(BaseOutput):
    """frames: "np" (B, F, H, W, 3) float in [0, 1]; "pt" (B, F, 3, H, W) in [0, 1]; "pil" B lists of F images;
    "latent" (B, T, C, h, w). fps: the frame rate to play them at (the pipeline's config). latents: the final latents
    (B, T, C, h, w) of the output's segments, whatever the output type (keep them to extend or regenerate losslessly).
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]
    fps: float
    latents: torch.Tensor | None = None


def saved_guidance_scale(folder: str | os.PathLike) -> float:
    """The guidance scale a saved pipeline folder keeps (model_index.json), without loading it; a folder saved before
    pipelines kept one gets the default, as `from_pretrained` gives it."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return float(index.get("guidance_scale", DEFAULT_GUIDANCE_SCALE))


def saved_memory_guidance(folder: str | os.PathLike) -> tuple[float, str, str]:
    """The memory guidance a saved pipeline folder keeps (model_index.json's memory_guidance_scale, _segments and
    _baseline), without loading it; what a folder saved before pipelines kept them lacks is the default, as
    `from_pretrained` gives it: (0, "all", "segments_apart")."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return (float(index.get("memory_guidance_scale", 0.0)), index.get("memory_guidance_segments", "all"),
            index.get("memory_guidance_baseline", "segments_apart"))


def checked_guidance_scale(scale: Any, where: str = "guidance_scale") -> float:
    """One guidance scale: a finite number >= 0 (not a bool), as float; ValueError naming `where` otherwise."""
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale >= 0):
        raise ValueError(f"{where}: expected a finite number >= 0, got {scale!r}")
    return float(scale)


def checked_memory_guidance_baseline(baseline: Any) -> str:
    """memory_guidance_baseline: one of MEMORY_BASELINES; ValueError naming what was given otherwise."""
    if baseline not in MEMORY_BASELINES:
        raise ValueError(f"memory_guidance_baseline: expected one of {', '.join(MEMORY_BASELINES)}, got "
                         f"{baseline!r}")
    return baseline


def checked_memory_guidance_segments(segments: Any) -> str:
    """memory_guidance_segments: one of MEMORY_GUIDANCE_SEGMENTS; ValueError naming what was given otherwise."""
    if segments not in MEMORY_GUIDANCE_SEGMENTS:
        raise ValueError(f"memory_guidance_segments: expected one of {', '.join(MEMORY_GUIDANCE_SEGMENTS)}, got "
                         f"{segments!r}")
    return segments


def memory_guidance_scales(memory_guidance_scale: float | Sequence[float], memory_guidance_segments: str,
                           storyboard: Storyboard) -> float | list[float]:
    """A call's memory_guidance_scale checked (as `segment_guidance_scales`) and placed: a number on "all" segments
    stays a number; on "continuing" ones it becomes one scale per segment, 0 on the first and on each scene's first.
    A list gives each segment its own already and is taken as it is. ValueError naming the argument otherwise."""
    checked_memory_guidance_segments(memory_guidance_segments)
    scale = segment_guidance_scales(memory_guidance_scale, storyboard.num_segments, "memory_guidance_scale")
    if isinstance(scale, list) or memory_guidance_segments == "all":
        return scale
    return [scale if continues else 0.0 for continues in storyboard.continues_scene]


def checked_segment_parts(segment_parts: Any, num_segments: int) -> dict[int, list[str]]:
    """A call's segment_parts checked: None, or one entry per storyboard segment, each None (the segment's own text)
    or [base, part_1, ...]: a string (may be empty) and at least one non-empty string. Returns {segment index: its
    entry} for the segments with parts; ValueError naming the entry otherwise."""
    if segment_parts is None:
        return {}
    if isinstance(segment_parts, str) or not isinstance(segment_parts, Sequence) or len(segment_parts) != num_segments:
        raise ValueError(f"segment_parts: expected one entry per storyboard segment ({num_segments}), each None or a "
                         f"list of texts, got {segment_parts!r}")
    parts = {}
    for j, entry in enumerate(segment_parts):
        if entry is None:
            continue
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) < 2 or not isinstance(
                entry[0], str) or not all(isinstance(text, str) and text.strip() for text in entry[1:]):
            raise ValueError(f"segment_parts[{j}] (segment {j + 1}): expected None or [base, part, ...] (a text, "
                             f"maybe empty, then non-empty texts), got {entry!r}")
        parts[j] = list(entry)
    return parts


def segment_guidance_scales(guidance_scale: float | Sequence[float], num_segments: int,
                            name: str = "guidance_scale") -> float | list[float]:
    """A call's guidance_scale (or another per-segment scale, `name`) checked: a number (every segment) or one number
    per storyboard segment, each a `checked_guidance_scale`. ValueError (naming what was given) otherwise."""
    if isinstance(guidance_scale, Sequence) and not isinstance(guidance_scale, str):
        if len(guidance_scale) != num_segments:
            raise ValueError(f"{name}: expected a number or one per segment ({num_segments}), "
                             f"got {len(guidance_scale)} numbers")
        return [checked_guidance_scale(x, f"{name}[{i}] (segment {i + 1})") for i, x in enumerate(guidance_scale)]
    if isinstance(guidance_scale, str):
        raise ValueError(f"{name}: expected a number or one per segment, got {guidance_scale!r}")
    return checked_guidance_scale(guidance_scale, name)


class TTTVideoPipeline(DiffusionPipeline, CogVideoXLoraLoaderMixin):
    r"""Storyboard-to-video generation with CogVideoX + gated TTT layers.

    Args:
        tokenizer, text_encoder: as CogVideoX (T5) or any transformers encoder whose output[0] is (N, L, D_text).
        vae ([`AutoencoderKLCogVideoX`]): decodes (B, C, T, h, w) latents to (B, 3, 4 (T - 1) + 1, H, W) frames.
        transformer ([`CogVideoXTTTTransformer3DModel`]): denoises all segments jointly.
        scheduler ([`CogVideoXDDIMScheduler`] or [`CogVideoXDPMScheduler`]).
        fps: frame rate of the videos; default: one segment's frames per 3 s, i.e. 4 * latent_frames_per_segment / 3
            (16 for CogVideoX; 8 for a model with 6 latent frames per segment). Stored in the pipeline's config.
        guidance_scale: the classifier-free guidance scale `__call__` uses when given none: the scale this model was
            measured to sample best at (6, CogVideoX's, unless its training recipe measured another). Stored in the
            pipeline's config (model_index.json).
        memory_guidance_scale, memory_guidance_segments, memory_guidance_baseline: likewise `__call__`'s memory
            guidance when given none (default 0: off; "all" or "continuing"; "segments_apart" or "no_ttt", see
            `__call__`). Stored in the pipeline's config; a scale > 0 needs a transformer with TTT layers.

    LoRA: diffusers' CogVideoX loader (`load_lora_weights`, `fuse_lora`, `set_adapters`, ...) on the transformer's
    attention; cache hooks: `transformer.enable_cache(...)` (docs/sampling.md).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        vae: AutoencoderKLCogVideoX,
        transformer: CogVideoXTTTTransformer3DModel,
        scheduler: CogVideoXDDIMScheduler | CogVideoXDPMScheduler,
        fps: float | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        memory_guidance_scale: float = 0.0,
        memory_guidance_segments: str = "all",
        memory_guidance_baseline: str = "segments_apart",
    ):
        super().__init__()
        if not isinstance(transformer, CogVideoXTTTTransformer3DModel):
            # what from_pretrained on a stock CogVideoX folder (or hub id) gives: its transformer has no segments
            raise TypeError(f"transformer: expected a CogVideoXTTTTransformer3DModel, got {type(transformer).__name__}"
                            "; for a stock CogVideoX pipeline use TTTVideoPipeline.from_cogvideox(path)")
        guidance_scale = checked_guidance_scale(guidance_scale)
        memory_guidance_scale = checked_guidance_scale(memory_guidance_scale, "memory_guidance_scale")
        checked_memory_guidance_segments(memory_guidance_segments)
        checked_memory_guidance_baseline(memory_guidance_baseline)
        if memory_guidance_scale > 0 and not transformer.has_ttt:
            raise ValueError("memory_guidance_scale: this transformer has no TTT layers to guide by; pass 0")
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                              scheduler=scheduler)
        if type(transformer) is CogVideoXTTTTransformer3DModel:
            # model_index.json names the module a component is imported from, and from_pretrained looks up the
            # component's diffusers base class (ModelMixin) in that same module. The model's own module does not
            # import ModelMixin; this one does and re-exports the class, so loading works.
            self.register_to_config(transformer=(__name__, CogVideoXTTTTransformer3DModel.__name__))
        self.vae_scale_factor_spatial = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_scale_factor_temporal = self.vae.config.temporal_compression_ratio
        if fps is None:
            fps = self.frames_per_segment / SEGMENT_SECONDS
        self.register_to_config(fps=float(fps), guidance_scale=guidance_scale,
                                memory_guidance_scale=memory_guidance_scale,
                                memory_guidance_segments=memory_guidance_segments,
                                memory_guidance_baseline=memory_guidance_baseline)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @property
    def frames_per_segment(self) -> int:
        """Pixel frames of every segment after the first (the first has one more)."""
        return self.transformer.config.latent_frames_per_segment * self.vae_scale_factor_temporal

    def num_frames(self, num_segments: int) -> int:
        """Pixel frames of n segments: frames_per_segment * n + 1 (48 n + 1 for CogVideoX)."""
        return (self.transformer.num_latent_frames(num_segments) - 1) * self.vae_scale_factor_temporal + 1

    # building

    @classmethod
    def from_cogvideox(cls, base: str | os.PathLike | CogVideoXPipeline, ttt_adapter: str | os.PathLike | None = None,
                       fps: float | None = None, dtype: torch.dtype | None = None,
                       guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                       **ttt_config) -> TTTVideoPipeline:
        """A pipeline from a stock CogVideoX pipeline (object, local directory or hub id) plus TTT layers.

        ttt_adapter: a safetensors file written by `CogVideoXTTTTransformer3DModel.save_adapter`; its TTT config (in
        the file's metadata) is used, and any `ttt_config` keyword must agree with it. Without an adapter the TTT
        weights are freshly initialised from `ttt_config` (gate_init, latent_frames_*, ...). fps, guidance_scale: the
        pipeline's config (see the class).
        """
        if ttt_adapter is not None:
            if not os.path.isfile(ttt_adapter):
                raise FileNotFoundError(f"TTT adapter file not found: {ttt_adapter}")
            with safe_open(os.fspath(ttt_adapter), framework="pt") as f:
                saved = json.loads((f.metadata() or {}).get("ttt_config", "{}"))
            clashes = {k: (v, saved[k]) for k, v in ttt_config.items() if k in saved and saved[k] != v}
            if clashes:
                raise ValueError(f"{ttt_adapter}: TTT config arguments differ from the adapter's: "
                                 + ", ".join(f"{k}={mine!r} (adapter: {theirs!r})" for k, (mine, theirs) in
                                             clashes.items()))
            ttt_config = {**saved, **ttt_config}
        if not isinstance(base, CogVideoXPipeline):
            base = CogVideoXPipeline.from_pretrained(base, dtype=dtype)
        transformer = CogVideoXTTTTransformer3DModel.from_base(base.transformer, adapter=ttt_adapter, **ttt_config)
        return cls(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=transformer,
                   scheduler=base.scheduler, fps=fps, guidance_scale=guidance_scale)

    # saving, and loading through DiffusionPipeline

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """DiffusionPipeline.save_pretrained, plus what `DiffusionPipeline.from_pretrained(save_directory,
        trust_remote_code=True)` needs to return a TTTVideoPipeline: model_index.json names the class as
        ["pipeline_ttt_video", "TTTVideoPipeline"] and the folder carries that file (`CODE_FILE_TEXT`), which imports
        this class, and the sampling code itself for processes that cannot import this repository (`BUNDLE_FILE`,
        pipeline/code_bundle.py). `TTTVideoPipeline.from_pretrained` needs neither (see `load_config`)."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub: the hub copy would lack the pipeline file and the code; save_pretrained to "
                             "a folder, then upload it (huggingface_hub.upload_folder)")
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = CLASS_NAME_ENTRY
        atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
        atomic_write_text(folder / CODE_FILE, CODE_FILE_TEXT)
        atomic_write_text(folder / BUNDLE_FILE, bundle_text())

    @classmethod
    def load_config(cls, *args, **kwargs):
        """ConfigMixin.load_config; for this class (not for DiffusionPipeline) the remote-code class entry written by
        `save_pretrained` reads as the plain class name, so `TTTVideoPipeline.from_pretrained(folder)` uses this class
        directly instead of running the folder's code file (which diffusers would refuse without trust_remote_code)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if list(config.get("_class_name") or []) == CLASS_NAME_ENTRY:
            config["_class_name"] = CLASS_NAME_ENTRY[1]
        return loaded

    # text

    def encode_prompt(
        self,
        texts: list[str],
        negative_texts: list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encodes each segment's text (and negative text for guidance), each distinct text once.

        texts, negative_texts: n strings, one per segment ("" is the null condition).
        Returns prompt_embeds (1, n, L, D), prompt_mask (1, n, L) and, with guidance, negative_prompt_embeds and
        negative_prompt_mask of the same shapes (else None, None). L = transformer.config.max_text_seq_length.
        """
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        wanted = list(texts) + (list(negative_texts) if do_classifier_free_guidance else [])
        distinct = list(dict.fromkeys(wanted))
        embeds, mask = encode_text(self.tokenizer, self.text_encoder, distinct,
                                   self.transformer.config.max_text_seq_length, device, dtype)
        row = {text: i for i, text in enumerate(distinct)}

        def gather(selection: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.tensor([row[t] for t in selection], device=device)
            return embeds[index].unsqueeze(0), mask[index].unsqueeze(0)

        prompt_embeds, prompt_mask = gather(list(texts))
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_mask, None, None
        if negative_texts is None or len(negative_texts) != len(texts):
            raise ValueError(f"negative_texts: expected {len(texts)} strings, one per segment, got {negative_texts!r}")
        return (prompt_embeds, prompt_mask, *gather(list(negative_texts)))

    def null_text_embedding(self, negative_text: str = "", device: torch.device | None = None,
                            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The null condition: the encoded empty (or negative) text, which the unconditional branch of guidance uses
        and which training's text dropout must substitute for a dropped caption.

        Returns embeds (L, D) and mask (L,) bool.
        """
        embeds, mask = encode_text(self.tokenizer, self.text_encoder, [negative_text],
                                   self.transformer.config.max_text_seq_length, device or self._execution_device,
                                   dtype or self.transformer.dtype)
        return embeds[0], mask[0]

    # latents

    def prepare_latents(self, batch_size: int, num_segments: int, height: int, width: int, dtype: torch.dtype,
                        device: torch.device, generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Initial noise for n segments: (B, T, C, height / 8, width / 8) with T = num_latent_frames(n), scaled by the
        scheduler's init_noise_sigma. `latents`, when given, must have that shape."""
        shape = (batch_size, self.transformer.num_latent_frames(num_segments), self.transformer.config.in_channels,
                 height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape} for {num_segments} segments, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    # given segments

    def encode_video(self, frames: VideoInput, height: int, width: int, what: str = "video") -> torch.Tensor:
        """Frames of whole segments ((F, H, W, 3) array, (F, 3, H, W) tensor in [0, 1] or PIL images, height x width)
        → latents (1, T, C, h, w) scaled by the VAE's scaling factor (pipeline/segment_context.py `encode_video`)."""
        config = self.transformer.config
        return encode_video(self.vae, self.video_processor, frames, height, width, config.latent_frames_first,
                            config.latent_frames_per_segment, what)

    # decoding

    def frame_batches(self, num_latent_frames: int) -> list[tuple[int, int]]:
        """The latent frame ranges the VAE decodes together (pipeline/vae_decode.py)."""
        return frame_batches(self.vae, num_latent_frames)

    def decode_windows(self, latents: torch.Tensor, decode_window: int | None = None) -> Iterator[torch.Tensor]:
        """Decodes latents (B, T, C, h, w) window by window with the VAE's causal cache carried
        (pipeline/vae_decode.py); decode_window None: one segment's latent frames."""
        if decode_window is None:
            decode_window = self.transformer.config.latent_frames_per_segment
        return decode_windows(self.vae, latents, decode_window)

    # checks

    def check_inputs(self, storyboard: Storyboard, height: int, width: int, num_inference_steps: int,
                     negative_text: str | None, output_type: str, cfg_mode: str, decode_window: int | None,
                     latents: torch.Tensor | None, callback_on_step_end_tensor_inputs: list[str] | None,
                     strict_text: bool = False, num_videos_per_prompt: int = 1) -> None:
        if height < 1 or width < 1 or height % self.vae_scale_factor_spatial or width % self.vae_scale_factor_spatial:
            raise ValueError(f"height and width must be positive multiples of {self.vae_scale_factor_spatial}, got "
                             f"{height} and {width}")
        patch = self.transformer.config.patch_size * self.vae_scale_factor_spatial
        if height % patch or width % patch:
            raise ValueError(f"height and width must be multiples of {patch} (VAE x patch size), got {height} and "
                             f"{width}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        train_steps = self.scheduler.config.num_train_timesteps
        if num_inference_steps > train_steps:
            raise ValueError(f"num_inference_steps must be at most the scheduler's {train_steps} training timesteps, "
                             f"got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {cfg_mode!r}")
        if decode_window is not None and decode_window < 1:
            raise ValueError(f"decode_window must be >= 1 latent frame, got {decode_window}")
        if negative_text is not None and not isinstance(negative_text, str):
            raise ValueError(f"negative_text must be a string, got {type(negative_text).__name__}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be a whole number >= 1, got {num_videos_per_prompt!r}")
        if latents is not None and latents.shape[0] != num_videos_per_prompt:
            raise ValueError(f"latents: expected batch size num_videos_per_prompt={num_videos_per_prompt}, got "
                             f"{latents.shape[0]}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                             f"got {unknown}")
        storyboard.check_token_budget(self.tokenizer, self.transformer.config.max_text_seq_length, negative_text,
                                      strict=strict_text)

    # properties, as CogVideoXPipeline

    @property
    def guidance_scale(self) -> float | torch.Tensor:
        """The scale in use; with one scale per segment a (1, T, 1, 1, 1) tensor, each latent frame its segment's."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    @property
    def current_timestep(self) -> torch.Tensor | None:
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        storyboard: Storyboard | str | os.PathLike | dict | list | None = None,
        prompt: str | list[str] | list[list[str]] | None = None,
        negative_prompt: str | list[str] | list[list[str]] | None = None,
        num_videos_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float | Sequence[float] | None = None,
        memory_guidance_scale: float | Sequence[float] | None = None,
        memory_guidance_segments: str | None = None,
        memory_guidance_baseline: str | None = None,
        memory_guidance_timesteps: tuple[int, int] | None = None,
        segment_parts: Sequence[Sequence[str] | None] | None = None,
        use_dynamic_cfg: bool = False,
        negative_text: str | None = None,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        video: VideoInput | None = None,
        video_latents: torch.Tensor | None = None,
        regenerate: Sequence[int] = (),
        reference: VideoInput | None = None,
        reference_latents: torch.Tensor | None = None,
        output_type: str = "np",
        cfg_mode: str = "batched",
        decode_window: int | None = None,
        max_segments: int | None = DEFAULT_MAX_SEGMENTS,
        strict_text: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | PipelineCallback
        | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_dict: bool = True,
    ) -> TTTVideoPipelineOutput | tuple:
        """Generates one video for a storyboard.

        Args:
            storyboard: a `Storyboard`, a path (.json/.yaml/.yml/.txt) or parsed JSON (see pipeline/storyboard.py).
            prompt, negative_prompt: diffusers' names, in place of a storyboard (see `storyboard_from_prompts`): a
                string (one segment), a list of strings (one scene, a segment each) or a list of lists (scenes);
                negative_prompt is one string for every segment or the same nesting as prompt. With a storyboard,
                a string negative_prompt is the same as negative_text.
            num_videos_per_prompt: videos made in one batch (B), each from its own noise; latents, if given, and the
                output have batch size B.
            num_inference_steps, guidance_scale, use_dynamic_cfg, eta, generator, attention_kwargs: as
                CogVideoXPipeline (guidance is off for guidance_scale <= 1; the dynamic schedule is CogVideoX's);
                guidance_scale None: the pipeline's own (`self.config.guidance_scale`); a list: one scale per
                storyboard segment, each applied to its segment's frames (say, guidance where a text describes what
                to draw and little where the model should draw what earlier segments showed; docs/sampling.md).
            memory_guidance_scale: m > 0 adds m * (conditional prediction - the same without memory, see
                memory_guidance_baseline) to the guided prediction: it pushes each segment further toward what TTT
                carries from the rest of the video (the look of a character that the text only names). One more
                transformer pass per step. A number or one per storyboard segment, like guidance_scale; 0 is off;
                None: the pipeline's own (`self.config.memory_guidance_scale`, 0 unless its recipe measured
                another). Needs a transformer with TTT layers; of diffusers' cache hooks, only FirstBlockCache and
                TaylorSeer (whose state is kept per call, "cond_without_memory" for this one). docs/sampling.md,
                "Memory guidance".
            memory_guidance_segments: where a single memory_guidance_scale applies: "all" segments, or "continuing"
                ones (0 on the storyboard's first segment and on each scene's first, whose texts set the stage);
                None: the pipeline's own (`self.config.memory_guidance_segments`). A list of scales is taken as it is.
            memory_guidance_baseline: the prediction without memory: "segments_apart" (the TTT layers read each
                segment alone, from their initial state: TTT's work within a segment stays, only what it carries
                between segments is taken away) or "no_ttt" (the TTT layers skipped: segment-local attention alone,
                which also takes TTT's work within the segment and pushes characters to be drawn big);
                None: the pipeline's own (`self.config.memory_guidance_baseline`).
            memory_guidance_timesteps: (low, high): memory guidance only on the steps whose timestep t has low <= t <
                high (guidance in a limited interval, as Kynkäänniemi et al. 2024 did for classifier-free guidance);
                None: on every step.
            segment_parts: per storyboard segment None or a list of texts [base, part_1, ..., part_K]: what every
                part shares (say, the backdrop; "" for none), then the parts (say, one per character on stage, each
                the base and that character's sentences). A segment with parts is guided by
                eps_u + g * ((eps_base - eps_u) + sum_k (eps_k - eps_base)) (the conjunction of Liu et al. 2022,
                "Compositional Visual Generation with Composable Diffusion Models", on the base) instead of its whole
                text's: each part's prediction draws one character alone, so no text asks the drawer to bind two
                looks to two places. Its memory guidance stays on the whole text. One more transformer pass per step
                for each entry of the segment with the most. Needs classifier-free guidance (guidance_scale > 1).
            negative_text: default negative text for segments without their own; when None the storyboard's default,
                else "" (the null condition). Each segment's own negative_text always wins.
            height, width: pixels; default the transformer's sample size times the VAE's 8.
            latents: (1, T, C, h, w) initial noise, T = num_latent_frames(n) (n + r with a reference of r segments);
                drawn with `generator` when None.
            video, video_latents: a video of the first k <= n segments, as frames ((F, H, W, 3) array, (F, 3, H, W)
                tensor in [0, 1] or PIL images, F = num_frames(k), encoded with the VAE) or as latents (1, T_k, C, h, w)
                (lossless). Its segments are kept clean (timestep 0, re-set after every scheduler step) except those
                in `regenerate`; the storyboard's segments after k are generated (extension). docs/sampling.md.
            regenerate: 0-based segments of the video to generate anew (the others keep their latents exactly).
            reference, reference_latents: a clip of r segments (frames or latents, as `video`) put before segment 1 as
                clean context with the null text; it is not part of the output.
            output_type: "np", "pil", "pt" or "latent" (shapes in `TTTVideoPipelineOutput`).
            cfg_mode: "batched" runs the conditional and unconditional branch as one batch of 2; "sequential" runs
                them in turn (half the activation memory, same result).
            decode_window: latent frames per VAE decode window (see `decode_windows`); None: one segment.
            max_segments: the most segments accepted (None: no limit).
            strict_text: refuse (StoryboardError) a text over the text encoder's budget of max_text_seq_length tokens;
                by default it is truncated with a warning naming the segment and the dropped words, as in diffusers.
            callback_on_step_end(pipe, step, timestep, tensors) -> dict: called after each step with the tensors
                named in callback_on_step_end_tensor_inputs (default ["latents"]); returned entries replace them.
        Returns:
            `TTTVideoPipelineOutput(frames, fps)`, or (frames,) when return_dict is False.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            wanted = callback_on_step_end.tensor_inputs
            if callback_on_step_end_tensor_inputs is not None and list(callback_on_step_end_tensor_inputs) != wanted:
                raise ValueError(f"callback_on_step_end_tensor_inputs {callback_on_step_end_tensor_inputs} differ "
                                 f"from the callback's own tensor_inputs {wanted}; pass one of them")
            callback_on_step_end_tensor_inputs = wanted
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if height is None:
            height = self.transformer.config.sample_height * self.vae_scale_factor_spatial
        if width is None:
            width = self.transformer.config.sample_width * self.vae_scale_factor_spatial

        # 1. Check inputs
        storyboard, negative_text = storyboard_from_prompts(storyboard, prompt, negative_prompt, negative_text)
        storyboard = load_storyboard(storyboard, max_segments)
        self.check_inputs(storyboard, height, width, num_inference_steps, negative_text, output_type, cfg_mode,
                          decode_window, latents, callback_on_step_end_tensor_inputs, strict_text,
                          num_videos_per_prompt)
        guidance_scale = segment_guidance_scales(
            self.config.guidance_scale if guidance_scale is None else guidance_scale, storyboard.num_segments)
        self._guidance_scale = guidance_scale
        memory_scale = memory_guidance_scales(
            self.config.memory_guidance_scale if memory_guidance_scale is None else memory_guidance_scale,
            self.config.memory_guidance_segments if memory_guidance_segments is None else memory_guidance_segments,
            storyboard)
        memory_baseline = checked_memory_guidance_baseline(
            self.config.memory_guidance_baseline if memory_guidance_baseline is None else memory_guidance_baseline)
        memory_per_segment = isinstance(memory_scale, list)
        do_memory_guidance = max(memory_scale) > 0 if memory_per_segment else memory_scale > 0
        interval = memory_guidance_timesteps
        if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
            raise ValueError(f"memory_guidance_timesteps: expected (low, high) with 0 <= low < high, got "
                             f"{memory_guidance_timesteps!r}")
        if do_memory_guidance and not getattr(self.transformer, "has_ttt", False):
            raise ValueError("memory_guidance_scale: this transformer has no TTT layers to guide by; pass 0")
        if do_memory_guidance:
            self._check_cache_keeps_passes_apart("memory_guidance_scale", "the pass without TTT", ", or pass 0")
        parts = checked_segment_parts(segment_parts, storyboard.num_segments)
        if parts:
            self._check_cache_keeps_passes_apart("segment_parts", "each part's pass")
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 2. Default call parameters
        device = self._execution_device
        per_segment = isinstance(guidance_scale, list)
        do_classifier_free_guidance = max(guidance_scale) > 1.0 if per_segment else guidance_scale > 1.0
        if parts and not do_classifier_free_guidance:
            raise ValueError("segment_parts: needs classifier-free guidance (guidance_scale > 1), whose unconditional "
                             "prediction each part's direction is taken from")
        scene_start = torch.tensor([[s.scene_start for s in storyboard.segments]], device=device)  # (1, n)

        # 3. Clean context segments (a video to extend or regenerate, a reference clip), encoded when given as frames
        if video is not None and video_latents is not None or reference is not None and reference_latents is not None:
            raise ValueError("give a video (or reference) either as frames or as latents, not both")
        given = (video, video_latents, reference, reference_latents)
        if num_videos_per_prompt > 1 and any(x is not None for x in given):
            raise ValueError("num_videos_per_prompt > 1 cannot be combined with kept video or reference segments; "
                             "make one call per video")
        if video is not None:
            video_latents = self.encode_video(video, height, width, "video")
        if reference is not None:
            reference_latents = self.encode_video(reference, height, width, "reference")
        config = self.transformer.config
        num_reference = 0 if reference_latents is None else latent_segments(
            reference_latents, config.latent_frames_first, config.latent_frames_per_segment, "reference")
        num_segments = num_reference + storyboard.num_segments
        latent_shape = (1, self.transformer.num_latent_frames(num_segments), config.in_channels,
                        height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)
        context = build_context(
            None if video_latents is None else video_latents.to(device, self.transformer.dtype), regenerate,
            None if reference_latents is None else reference_latents.to(device, self.transformer.dtype),
            storyboard.num_segments, config.latent_frames_first, config.latent_frames_per_segment, latent_shape)
        if num_reference:  # the reference's segments: the null text, same scene as segment 1
            scene_start = torch.cat([torch.zeros(1, num_reference, dtype=torch.bool, device=device), scene_start], 1)

        # 4. Encode every segment's text (and negative text)
        null = [""] * num_reference
        prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask = self.encode_prompt(
            null + storyboard.texts, null + storyboard.negative_texts(negative_text), do_classifier_free_guidance,
            device=device)
        # the parts' passes: pass k gives each segment with more than k entries its entry k (0: the base), the others
        # their text
        part_embeds = [self.encode_prompt(null + [parts[j][k] if k < len(parts.get(j, ())) else text
                                                  for j, text in enumerate(storyboard.texts)],
                                          do_classifier_free_guidance=False, device=device)[:2]
                       for k in range(max(map(len, parts.values()), default=0))]
        if num_videos_per_prompt > 1:  # (1, n, ...) -> (B, n, ...)
            prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask, scene_start = (
                None if x is None else x.repeat_interleave(num_videos_per_prompt, dim=0)
                for x in (prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask, scene_start))
            part_embeds = [tuple(x.repeat_interleave(num_videos_per_prompt, dim=0) for x in pair)
                           for pair in part_embeds]

        # 5. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        timestep_values = timesteps.tolist()  # read once, not one host sync per step
        self._num_timesteps = len(timesteps)

        # 6. Latents for all segments, the kept ones clean
        latents = self.prepare_latents(num_videos_per_prompt, num_segments, height, width, prompt_embeds.dtype,
                                       device, generator, latents)
        keep_frames = clean = None
        if context is not None:
            keep_frames = context.keep_frames(
                self.transformer.segment_layout(num_segments, *latent_shape[-2:], device).frame_segment)
            clean = context.latents.to(latents.dtype)
            latents = torch.where(keep_frames, clean, latents)

        def per_frame(scales: list[float], reference_scale: float) -> torch.Tensor:
            """(1, T, 1, 1, 1): each latent frame its segment's scale (a reference's segments: reference_scale)."""
            frame_segment = frame_segments(num_segments, config.latent_frames_first, config.latent_frames_per_segment)
            return torch.tensor([reference_scale] * num_reference + scales, device=device)[
                frame_segment.to(device)].view(1, -1, 1, 1, 1)

        if per_segment:  # a reference is kept: 1 (its prediction as it is), 0 (no memory push)
            guidance_scale = self._guidance_scale = per_frame(guidance_scale, 1.0)
        if memory_per_segment:
            memory_scale = per_frame(memory_scale, 0.0)
        # each part's pass with the frames it composes: (1, T, 1, 1, 1), 1 on the segments with that many entries
        entries = [len(parts.get(j, ())) for j in range(storyboard.num_segments)]
        part_passes = [(embeds, mask, per_frame([float(k < n) for n in entries], 0.0))
                       for k, (embeds, mask) in enumerate(part_embeds)]
        composed_frames = part_passes[0][2].bool() if part_passes else None  # the base's pass: every composed segment

        # 7. Denoising loop over the whole sequence (kept segments at t = 0, re-set after every step)
        if self.transformer.is_cache_enabled:  # a run stopped midway leaves its cache hooks' state behind
            self.transformer._reset_stateful_cache()
        is_dpm = isinstance(self.scheduler, CogVideoXDPMScheduler)
        old_pred_original_sample = None  # DPM-solver++ keeps the previous x0 prediction
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = self._predict(latents, t, prompt_embeds, prompt_mask, negative_prompt_embeds,
                                           negative_mask, scene_start, cfg_mode, attention_kwargs, context)
                if use_dynamic_cfg:
                    # CogVideoX's schedule, fed the timestep value as CogVideoX does (its authors keep the resulting
                    # wave on purpose: github.com/zai-org/CogVideo/issues/267)
                    progress = (num_inference_steps - timestep_values[i]) / num_inference_steps
                    self._guidance_scale = 1 + guidance_scale * ((1 - math.cos(math.pi * progress**5.0)) / 2)
                noise_pred_text = noise_pred[1] if do_classifier_free_guidance else noise_pred
                if do_classifier_free_guidance:
                    noise_pred_uncond = noise_pred[0]
                    direction = noise_pred_text - noise_pred_uncond
                    if part_passes:  # a segment with parts: the sum of its parts' directions
                        composed = base = None
                        for k, (embeds, mask, frames) in enumerate(part_passes):
                            part = self._predict(latents, t, embeds, mask, None, None, scene_start, cfg_mode,
                                                 attention_kwargs, context, cache_context=f"part_{k}")
                            if k == 0:  # the base: every segment with parts has it in this pass
                                base, composed = part, part - noise_pred_uncond
                            else:
                                composed = composed + frames * (part - base)
                        direction = torch.where(composed_frames, composed, direction)
                    noise_pred = noise_pred_uncond + self.guidance_scale * direction
                if do_memory_guidance and (memory_guidance_timesteps is None or memory_guidance_timesteps[0]
                                           <= timestep_values[i] < memory_guidance_timesteps[1]):
                    # the conditional branch again, without memory
                    with self.transformer.without_memory(memory_baseline):
                        noise_pred_alone = self._predict(latents, t, prompt_embeds, prompt_mask, None, None,
                                                         scene_start, cfg_mode, attention_kwargs, context,
                                                         cache_context="cond_without_memory")
                    noise_pred = noise_pred + memory_scale * (noise_pred_text - noise_pred_alone)

                if is_dpm:
                    latents, old_pred_original_sample = self.scheduler.step(
                        noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
                        eta=eta, generator=generator, return_dict=False)
                else:
                    latents = self.scheduler.step(noise_pred, t, latents, eta=eta, generator=generator,
                                                  return_dict=False)[0]
                latents = latents.to(prompt_embeds.dtype)
                if keep_frames is not None:
                    latents = torch.where(keep_frames, clean, latents)

                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "negative_prompt_embeds": negative_prompt_embeds}
                    callback_outputs = callback_on_step_end(
                        self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs})
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        # 8. Decode in windows, each moved to the CPU as it is done; a reference clip's frames are dropped after
        # the decode (the VAE is causal: the first segment decodes as it follows the reference)
        if output_type == "latent":
            frames = latents[:, self.transformer.num_latent_frames(num_reference) if num_reference else 0:]
        else:
            windows = [self.video_processor.postprocess_video(window, output_type="pt").cpu()  # (B, F_w, 3, H, W)
                       for window in self.decode_windows(latents, decode_window)]
            video = torch.cat(windows, dim=1)
            if num_reference:
                video = video[:, self.num_frames(num_reference):]
            if output_type == "pt":
                frames = video
            else:
                frames = video.permute(0, 1, 3, 4, 2).float().numpy()  # (B, F, H, W, 3)
                if output_type == "pil":
                    frames = [self.video_processor.numpy_to_pil(v) for v in frames]
        self.maybe_free_model_hooks()

        if not return_dict:
            return (frames,)
        return TTTVideoPipelineOutput(frames=frames, fps=self.config.fps, latents=latents)

    def _check_cache_keeps_passes_apart(self, argument: str, passes: str, way_out: str = "") -> None:
        """ValueError naming `argument` when diffusers' cache hooks are on and keep one state for every transformer
        call (Pyramid Attention Broadcast, FasterCache), which an extra pass per step (`passes`) would mix up;
        FirstBlockCache and TaylorSeer keep one per `cache_context` and are fine."""
        if self.transformer.is_cache_enabled and not isinstance(
                self.transformer._cache_config, (FirstBlockCacheConfig, TaylorSeerCacheConfig)):
            raise ValueError(f"{argument}: not combined with {type(self.transformer._cache_config).__name__}, whose "
                             f"hooks keep one state for every transformer call, not one for {passes}; use "
                             f"FirstBlockCacheConfig or TaylorSeerCacheConfig, disable the cache{way_out}")

    def _predict(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                 negative_prompt_embeds: torch.Tensor | None, negative_mask: torch.Tensor | None,
                 scene_start: torch.Tensor, cfg_mode: str, attention_kwargs: dict | None,
                 segment_context: SegmentContext | None = None, cache_context: str = "cond"):
        """The transformer's prediction (B, T, C, h, w) in float32; with guidance a pair (unconditional, conditional).

        latents (B, T, C, h, w); prompt/negative embeds (B, n, L, D) and masks (B, n, L); scene_start (B, n);
        segment_context: kept segments get timestep 0 (a (B, n) timestep), else every segment gets t;
        cache_context: the cache hooks' name for the conditional branch when it runs alone.
        """

        def timestep(batch: int) -> torch.Tensor:
            return t.expand(batch) if segment_context is None else segment_context.timesteps(t, batch)

        def run(x, embeds, mask, starts, context):
            x = self.scheduler.scale_model_input(x, t)
            with self.transformer.cache_context(context):
                out = self.transformer(hidden_states=x, encoder_hidden_states=embeds, timestep=timestep(x.shape[0]),
                                       encoder_attention_mask=mask, scene_start=starts,
                                       attention_kwargs=attention_kwargs, return_dict=False)[0]
            return out.float()

        if negative_prompt_embeds is None:
            return run(latents, prompt_embeds, prompt_mask, scene_start, cache_context)
        if cfg_mode == "sequential":
            return (run(latents, negative_prompt_embeds, negative_mask, scene_start, "uncond"),
                    run(latents, prompt_embeds, prompt_mask, scene_start, "cond"))
        out = run(torch.cat([latents, latents]), torch.cat([negative_prompt_embeds, prompt_embeds]),
                  torch.cat([negative_mask, prompt_mask]), torch.cat([scene_start, scene_start]), "cond_uncond")
        return out.chunk(2)


def storyboard_from_prompts(storyboard: Any, prompt: Any, negative_prompt: Any,
                            negative_text: str | None) -> tuple[Any, str | None]:
    """(storyboard, negative_text) for `__call__` from either a storyboard or diffusers' prompt / negative_prompt.

    prompt: "text" (one segment), ["text", ...] (one scene, a segment each) or [["text", ...], ...] (scenes, each
    after the first opening with a scene transition). negative_prompt: a string for every segment (the default
    negative text) or per segment in the same nesting as prompt. Shape errors raise StoryboardError naming the place.
    """
    if storyboard is not None and prompt is not None:
        raise ValueError("pass either storyboard or prompt, not both")
    if isinstance(negative_prompt, str) or negative_prompt is None:
        if negative_prompt is not None and negative_text is not None:
            raise ValueError("pass either negative_prompt or negative_text, not both")
        negative_text = negative_prompt if negative_prompt is not None else negative_text
        negative_prompt = None
    if storyboard is not None:
        if negative_prompt is not None:
            raise ValueError("a per-segment negative_prompt (a list) goes with prompt; a storyboard carries its "
                             "segments' negative_text itself")
        return storyboard, negative_text
    if prompt is None:
        raise ValueError("pass a storyboard or a prompt")

    def scenes_of(value: Any, name: str) -> list[list[Any]]:
        if isinstance(value, str):
            return [[value]]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
            return [list(scene) for scene in value]
        if isinstance(value, (list, tuple)) and not any(isinstance(v, (list, tuple)) for v in value):
            return [list(value)]
        raise StoryboardError([f"{name}: expected a string, a list of strings (one scene) or a list of lists of "
                               f"strings (scenes), got {type(value).__name__}"])

    scenes = scenes_of(prompt, "prompt")
    negatives = None if negative_prompt is None else scenes_of(negative_prompt, "negative_prompt")
    if negatives is not None and [len(s) for s in negatives] != [len(s) for s in scenes]:
        raise StoryboardError([f"negative_prompt: expected one text per segment, nested like prompt "
                               f"({[len(s) for s in scenes]} segments per scene), got {[len(s) for s in negatives]}"])
    single = len(scenes) == 1
    segments = []
    for i, scene in enumerate(scenes):
        if not scene:
            raise StoryboardError([f"prompt[{i}]: an empty scene; expected at least one text"])
        for j, text in enumerate(scene):
            place = f"prompt[{j}]" if single else f"prompt[{i}][{j}]"
            segments.append(Segment(text, None if negatives is None else negatives[i][j],
                                    scene_start=i > 0 and j == 0, place=place))
    return Storyboard(segments), negative_text
