"""Checkpoint files: read safetensors headers and tensors, validate against the config's manifest, write
sharded safetensors by streaming.

The transformer checkpoint is the real HF layout: `config.json`, `model.safetensors.index.json` + shards (or a
single `model.safetensors`), `codec.pth`, tokenizer files. Header reads touch no tensor data, so analysis of a
9 GB checkpoint costs milliseconds. The streaming writer lays out a whole shard's header from the tensor specs
first, then appends each tensor's bytes as it is produced, so a full-size model is never held in memory.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from . import spec
from .config import DualARConfig, load_transformer_config
from .io import atomic_path, write_json_atomic
from .manifest import TensorSpec, transformer_manifest


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as is; the message names the file and the tensors."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple
    dtype: str            # fishlab dtype name (bfloat16, float32, uint8, ...)
    file: Path
    start: int            # absolute byte offset of the data in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


_ST_CODE = {v: k for k, v in spec.SAFETENSORS_DTYPES.items()}
_TORCH_DTYPES = {name: getattr(torch, name) for name in spec.SAFETENSORS_DTYPES.values()}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------

def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and `__metadata__` of one .safetensors file, reading only its header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated file ({size} bytes; not a safetensors file)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: truncated or corrupt header (header claims {n} bytes, "
                                      f"file has {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    data_end = 0
    for name, h in header.items():
        try:
            dtype = spec.SAFETENSORS_DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {h!r}") from None
        if e - b != math.prod(shape) * spec.DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} has {e - b} bytes for shape {list(shape)} {dtype}")
        data_end = max(data_end, e)
        out[name] = TensorInfo(name, shape, dtype, path, base + b, base + e)
    if base + data_end > size:
        raise CheckpointError(f"{path}: truncated file: tensors need {base + data_end} bytes, file has {size}")
    return out, dict(meta)


def transformer_files(ckpt_dir: str | Path) -> list[Path]:
    """The weight files of a transformer checkpoint: the index's shards (sorted by name) or model.safetensors."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    index = d / spec.INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are missing on disk: {', '.join(missing)}")
        return [d / f for f in files]
    single = d / spec.SINGLE_FILE
    if single.exists():
        return [single]
    raise CheckpointError(f"{d}: no {spec.INDEX_FILE} or {spec.SINGLE_FILE} found")


def read_headers(ckpt_dir: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """All tensor infos of a transformer checkpoint (every shard), plus merged safetensors metadata."""
    infos: dict[str, TensorInfo] = {}
    meta: dict[str, str] = {}
    for f in transformer_files(ckpt_dir):
        part, m = read_safetensors_header(f)
        dup = infos.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: tensor(s) also present in another shard: {_few(sorted(dup))}")
        infos.update(part)
        meta.update(m)
    index = Path(ckpt_dir) / spec.INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = [k for k, v in weight_map.items() if k not in infos or infos[k].file.name != v]
        if wrong:
            raise CheckpointError(f"{index}: weight_map disagrees with the shards for {_few(wrong)}")
    return infos, meta


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return f"{shown}{f', ... ({len(names)} in all)' if len(names) > n else f' ({len(names)})'}"


def compare_to_manifest(infos: dict[str, TensorInfo], expected: Iterable[TensorSpec], where: str,
                        check_dtype: bool = False) -> None:
    """One clear error naming missing, unexpected and wrongly shaped tensors (first few and counts)."""
    exp = {s.name: s for s in expected}
    missing = [n for n in exp if n not in infos]
    unexpected = [n for n in infos if n not in exp]
    wrong = [f"{n}: expected {list(exp[n].shape)}, found {list(infos[n].shape)}"
             for n in exp if n in infos and tuple(infos[n].shape) != tuple(exp[n].shape)]
    if check_dtype:
        wrong += [f"{n}: expected {exp[n].dtype}, found {infos[n].dtype}"
                  for n in exp if n in infos and infos[n].dtype != exp[n].dtype]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            parts.append(f"wrong shape/dtype {_few(wrong, 3)}")
        raise CheckpointError(f"{where}: checkpoint does not match its config: " + "; ".join(parts))


def validate_transformer(ckpt_dir: str | Path, cfg: DualARConfig | None = None) -> tuple[DualARConfig, dict]:
    """Config + header infos of a plain (unquantized) checkpoint, checked tensor by tensor against the
    manifest. Reads headers only."""
    infos, _ = read_headers(ckpt_dir)
    cfg = cfg or load_transformer_config(ckpt_dir)
    compare_to_manifest(infos, transformer_manifest(cfg), str(ckpt_dir))
    return cfg, infos


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes read with plain file reads into a new tensor (no mmap: nothing but the tensor itself
    is resident afterwards)."""
    return read_tensor_into(info, torch.empty(info.shape, dtype=torch_dtype(info.dtype)))


def read_tensor_into(info: TensorInfo, t: torch.Tensor) -> torch.Tensor:
    """read_tensor into the contiguous tensor `t` of the tensor's shape and dtype (e.g. a reused buffer)."""
    if info.nbytes == 0:
        return t
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        done = 0
        while done < info.nbytes:
            n = f.readinto(buf[done:])
            if not n:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name}")
            done += n
    return t


def iter_row_blocks(info: TensorInfo, max_elems: int = 1 << 24) -> Iterator[torch.Tensor]:
    """A tensor's rows (dim 0) in consecutive blocks of at most ~max_elems values, each read with plain file
    reads into one reused buffer (valid until the next block is read), so a streaming writer holds one block of
    a 0.8 GB embedding, not all of it."""
    shape = tuple(info.shape) or (1,)
    row = math.prod(shape[1:])
    rows_per = max(1, max_elems // max(1, row))
    dtype = torch_dtype(info.dtype)
    buf = torch.empty((min(rows_per, shape[0]),) + shape[1:], dtype=dtype)
    item = spec.DTYPE_BYTES[info.dtype]
    for r0 in range(0, shape[0], rows_per):
        n = min(rows_per, shape[0] - r0)
        off = info.start + r0 * row * item
        block = TensorInfo(info.name, (n,) + shape[1:], info.dtype, info.file, off, off + n * row * item)
        yield read_tensor_into(block, buf[:n])


def iter_tensors(infos: dict[str, TensorInfo], names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time (`read_tensor`), so only the tensor in hand is resident."""
    for n in (list(names) if names is not None else list(infos)):
        yield n, read_tensor(infos[n])


def load_transformer_state_dict(ckpt_dir: str | Path, cfg: DualARConfig | None = None,
                                device: str | torch.device = "cpu",
                                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{HF name: tensor} of a plain checkpoint, strictly validated against the manifest first."""
    cfg, infos = validate_transformer(ckpt_dir, cfg)
    out = {}
    for name, t in iter_tensors(infos):
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to(device)
    return out


def tree_bytes(path: str | Path) -> int:
    """Bytes on disk of a file or every file under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    """A tensor to be written: its header facts now, its data from `make()` later (streaming)."""
    name: str
    shape: tuple
    dtype: str
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * spec.DTYPE_BYTES[self.dtype]


def plan_shards(tensors: list[OutTensor], n_shards: int) -> list[list[OutTensor]]:
    """Split tensors in order into n_shards contiguous shards of roughly equal bytes."""
    total = sum(t.nbytes for t in tensors)
    target = total / max(1, n_shards)
    shards: list[list[OutTensor]] = [[]]
    acc = 0
    for t in tensors:
        if shards[-1] and acc + t.nbytes / 2 > target * len(shards) and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(t)
        acc += t.nbytes
    return shards


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_CODE[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_streaming(path: str | Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None,
                                progress: Callable[[int], None] | None = None) -> None:
    """Write one .safetensors file atomically, producing each tensor only when its bytes are due."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(_header_bytes(tensors, metadata))
            for t in tensors:
                x = t.make()
                if tuple(x.shape) != tuple(t.shape) or dtype_name(x.dtype) != t.dtype:
                    raise CheckpointError(f"{path}: tensor {t.name} was announced as {list(t.shape)} {t.dtype} "
                                          f"but produced {list(x.shape)} {dtype_name(x.dtype)}")
                x = x.detach().contiguous().cpu()
                f.write(memoryview(x.view(torch.uint8).reshape(-1).numpy()) if x.numel() else b"")
                if progress:
                    progress(t.nbytes)
                del x
            f.flush()


def write_sharded(out_dir: str | Path, tensors: list[OutTensor], n_shards: int = 2,
                  metadata: dict[str, str] | None = None,
                  progress: Callable[[int], None] | None = None) -> list[Path]:
    """HF layout: model-0000i-of-0000n.safetensors + model.safetensors.index.json (or a single
    model.safetensors when n_shards == 1). Each file is written atomically; the index last."""
    out_dir = Path(out_dir)
    if n_shards <= 1:
        p = out_dir / spec.SINGLE_FILE
        write_safetensors_streaming(p, tensors, metadata, progress)
        return [p]
    shards = plan_shards(tensors, n_shards)
    n = len(shards)
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        p = out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors_streaming(p, shard, metadata, progress)
        paths.append(p)
        weight_map.update({t.name: p.name for t in shard})
    write_json_atomic(out_dir / spec.INDEX_FILE,
                      {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map})
    return paths


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inspect_checkpoint(ckpt_dir: str | Path, cfg: DualARConfig | None = None) -> dict:
    """What is on disk, from headers only: files and their sizes, tensor count and dtypes, the bytes the
    manifest predicts for the config's dtype, and the codec/tokenizer files present. Raises CheckpointError
    when the tensors do not match the config."""
    d = Path(ckpt_dir)
    cfg, infos = validate_transformer(d, cfg)
    files = transformer_files(d)
    dtypes: dict[str, int] = {}
    for i in infos.values():
        dtypes[i.dtype] = dtypes.get(i.dtype, 0) + 1
    extra = {name: (d / name).stat().st_size for name in (spec.CODEC_FILE, spec.TOKENIZER_FILE, spec.CONFIG_FILE)
             if (d / name).exists()}
    return {
        "path": str(d),
        "files": {f.name: f.stat().st_size for f in files},
        "weights_bytes": sum(f.stat().st_size for f in files),
        "tensor_data_bytes": sum(i.nbytes for i in infos.values()),
        "manifest_bytes": sum(s.nbytes for s in transformer_manifest(cfg)),
        "tensors": len(infos),
        "dtypes": dtypes,
        "other_files": extra,
    }
