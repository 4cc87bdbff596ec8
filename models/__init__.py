"""nn.Modules of TTT-Video: the TTT layer, the segment layout and the TTT-augmented CogVideoX transformer."""

from .layout import SegmentLayout, num_latent_frames, segment_layout
from .transformer_ttt import CogVideoXTTTBlock, CogVideoXTTTTransformer3DModel
from .ttt_layer import TTTLayer

__all__ = ["CogVideoXTTTBlock", "CogVideoXTTTTransformer3DModel", "SegmentLayout", "TTTLayer", "num_latent_frames",
           "segment_layout"]
