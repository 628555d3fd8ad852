"""The quantizers a phase file can pick (`quantizer:` key) and their settings (`quantizer_args:`).

A quantizer decides the stored values of one weight (its qparams, and for GPTQ the rounding order with error
feedback); every one of them ends in `primitives.pack_qtensor`, so the packed formats, the loader and the kernels
never depend on which one ran. `rtn` is today's round-to-nearest with absmax (or min/max) qparams.
"""
from __future__ import annotations

#: Each quantizer's settings and their defaults (a phase's `quantizer_args` overrides any of them).
DEFAULT_ARGS: dict[str, dict] = {
    "rtn": {},
    "mse": {},
    "hqq": {},
    "gptq": {},
}


def check_args(quantizer: str, args: dict) -> str:
    """'' when `args` are settings `quantizer` knows, else what is wrong (for the phase file's error)."""
    known = DEFAULT_ARGS.get(quantizer)
    if known is None:
        return f"unknown quantizer {quantizer!r} (known: {', '.join(DEFAULT_ARGS)})"
    unknown = sorted(set(args) - set(known))
    if unknown:
        return f"{quantizer} has no settings {unknown} (known: {', '.join(known) or 'none'})"
    return ""


def resolved_args(quantizer: str, args: dict) -> dict:
    """The defaults with a phase's settings on top."""
    return {**DEFAULT_ARGS[quantizer], **args}
