"""What the safetensors-folder formats (fp8, gptq) share: the weight files' tensor infos, and the codec.pth a
published folder may carry beside them."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import spec
from ..checkpoint import TensorInfo, read_headers, read_safetensors_header, transformer_files
from ..model.codec_load import read_codec_file


def weight_infos(path: Path) -> tuple[dict[str, TensorInfo], list[Path]]:
    """Tensor infos of a safetensors file, or of a folder's model.safetensors / index + shards."""
    if path.is_file():
        return read_safetensors_header(path)[0], [path]
    return read_headers(path)[0], transformer_files(path)


def folder_codec(path: Path, weights: list[Path]) -> tuple[Callable[[], dict | None], int, int, str]:
    """(loader of the folder's codec.pth as float32 or None, its bytes, bytes of the folder's other files
    (configs, tokenizer, ...), a note for the report)."""
    if path.is_file():
        return (lambda: None), 0, 0, "codec: none (a single weights file; the base checkpoint's)"
    codec = path / spec.CODEC_FILE
    skip = {w.name for w in weights} | {spec.CODEC_FILE}
    other = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name not in skip)
    if not codec.is_file():
        return (lambda: None), 0, other, "codec: none in the folder (the base checkpoint's)"
    return ((lambda: {k: v.float() for k, v in read_codec_file(codec).items()}), codec.stat().st_size, other,
            f"codec: {spec.CODEC_FILE} beside the weights")
