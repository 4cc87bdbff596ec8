"""nn.Modules of TTT-Video: the TTT layer, the segment layout and the TTT-augmented CogVideoX transformer."""

from .layout import SegmentLayout, TokenOrder, num_latent_frames, segment_layout
from .transformer_ttt import CogVideoXTTTBlock, CogVideoXTTTTransformer3DModel
from .ttt_layer import TTTLayer

__all__ = ["CogVideoXTTTBlock", "CogVideoXTTTTransformer3DModel", "SegmentLayout", "TTTLayer", "TokenOrder",
           "num_latent_frames", "segment_layout"]
