"""The S2 Pro model, clean-room: DualAR transformer (slow + fast AR) and the modded-DAC codec; and `TextLM`, a
plain text LM of the same blocks (the trained proxy model).

    from fishlab.model import load_transformer, load_codec
"""
from .codec import Codec
from .codec_load import load_codec
from .dualar import DualARTransformer, replace_linears
from .load import load_transformer
from .textlm import TextLM

__all__ = ["Codec", "DualARTransformer", "TextLM", "load_codec", "load_transformer", "replace_linears"]
