"""The S2 Pro model, clean-room: DualAR transformer (slow + fast AR) and the modded-DAC codec.

    from fishlab.model import load_transformer, load_codec
"""
from .codec import Codec
from .codec_load import load_codec
from .dualar import DualARTransformer, replace_linears
from .load import load_transformer

__all__ = ["Codec", "DualARTransformer", "load_codec", "load_transformer", "replace_linears"]
