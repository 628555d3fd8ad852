"""Load the codec from `codec.pth` (the real S2 Pro file) or `model.safetensors` (golden sets), strictly.

The reference loads with `strict=False`, which would also let a misnamed parameter silently keep its random
init. Here (spec §8.2):
1. `torch.load(weights_only=True)` (mmap when the file is a zip checkpoint). A pickle that needs anything but
   tensors and plain containers, i.e. one that could run code, is refused with a `CheckpointError`.
2. A `state_dict` wrapper is unwrapped; if any key contains `generator`, only keys containing `generator.`
   are kept, with that substring removed.
3. Exactly the stale buffers the real file carries are dropped: `<transformer>.freqs_cis` and
   `<transformer>.causal_mask` at the codec's transformer paths. Nothing else is dropped.
4. Every parameter name must be present with the right shape and nothing else may be left: otherwise one
   `CheckpointError` names the file, the counts and the first few names.

    codec = load_codec("checkpoints/s2-pro")            # dir with codec.pth (+ optional codec_config.json)
    codec = load_codec("../shared/golden/A/codec")      # dir with model.safetensors + config.json
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .. import spec
from ..checkpoint import CheckpointError
from ..config import CodecConfig, load_codec_config
from ..io import atomic_path
from .codec import Codec, WindowLimitedTransformer


CODEC_SAFETENSORS_FILE = spec.SINGLE_FILE   # golden sets store the codec as model.safetensors
_SHOW = 5   # names quoted per problem in an error message


def find_codec_file(path: str | Path) -> Path:
    """The codec weights file for `path`: the file itself, or in a directory `codec.pth`, else
    `model.safetensors`."""
    p = Path(path)
    if p.is_dir():
        for name in (spec.CODEC_FILE, CODEC_SAFETENSORS_FILE):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: no {spec.CODEC_FILE} or {CODEC_SAFETENSORS_FILE} in this directory")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such codec checkpoint file or directory")
    return p


def read_codec_file(file: str | Path) -> dict[str, Tensor]:
    """The raw tensors of a codec file (steps 1-2 above): a flat {name: tensor} dict."""
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read as safetensors ({e})") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|$)", str(e), re.S)
        detail = " ".join((m.group(1) if m else str(e) or type(e).__name__).split()).split(". Please use")[0]
        reason = ("the pickle references a callable beyond tensors and plain containers, so loading it could "
                  "run code" if "global" in detail.lower() else "the pickle is not a plain dict of tensors")
        raise CheckpointError(f"{file}: refused to load: {reason} (weights-only unpickler: {detail})") from None
    except Exception as e:  # corrupt zip, truncated file, not a torch file at all ...
        raise CheckpointError(f"{file}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{file}: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not "
                              f"name -> tensor, e.g. {[str(k) for k in bad[:_SHOW]]}")
    sd = dict(obj)
    if any("generator" in k for k in sd):
        sd = {k.replace("generator.", ""): v for k, v in sd.items() if "generator." in k}
    return sd


def _meta_codec(config: CodecConfig) -> Codec:
    with torch.device("meta"):
        return Codec(config)


def stale_buffer_names(config: CodecConfig | Codec) -> set[str]:
    """The buffer keys an S1-era codec file carries that no module consumes (spec §8.1):
    `<path>.freqs_cis` and `<path>.causal_mask` for every codec transformer."""
    model = config if isinstance(config, Codec) else _meta_codec(config)
    return {f"{name}.{suffix}" for name, mod in model.named_modules()
            if isinstance(mod, WindowLimitedTransformer) for suffix in spec.CODEC_STALE_BUFFER_SUFFIXES}


def check_codec_state_dict(sd: Mapping[str, Tensor], config: CodecConfig, source: str | Path = "state dict"
                           ) -> dict[str, Tensor]:
    """Drop the stale buffers (step 3) and check names and shapes strictly (step 4); returns the clean dict
    in the model's parameter order."""
    model = _meta_codec(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stale = stale_buffer_names(model)
    sd = {k: v for k, v in sd.items() if k not in stale}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected
              if k in sd and tuple(sd[k].shape) != expected[k]]
    dtypes = [f"{k} {sd[k].dtype}" for k in expected if k in sd and not sd[k].dtype.is_floating_point]
    problems = []
    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
                        ("not floating point", dtypes)):
        if names:
            more = f" (+{len(names) - _SHOW} more)" if len(names) > _SHOW else ""
            problems.append(f"{len(names)} {what}: {', '.join(names[:_SHOW])}{more}")
    if problems:
        raise CheckpointError(f"{source}: does not match the codec config ({len(expected)} parameters expected, "
                              f"{len(sd)} found after dropping stale buffers): " + "; ".join(problems))
    return {k: sd[k] for k in expected}


def load_codec(path: str | Path, config: CodecConfig | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Codec:
    """A `Codec` in eval mode with the weights of `path` (a directory or a codec.pth / .safetensors file),
    cast to `dtype` on `device`. The config is `config`, else the codec_config.json / config.json (golden
    schema) beside the weights, else S2 Pro's defaults. No random init is done: the model is built on the
    meta device and the loaded tensors are assigned (a float32 codec.pth on the CPU stays memory-mapped)."""
    file = find_codec_file(path)
    if config is None:
        config = load_codec_config(Path(path) if Path(path).is_dir() else file.parent)
    sd = check_codec_state_dict(read_codec_file(file), config, file)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model = _meta_codec(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def write_codec_pth(state_dict: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write a flat {name: tensor} dict as a codec.pth (torch.save), atomically: a temp file beside `path`,
    then a rename. Views are saved as compact copies, not with their whole base storage."""
    out = {}
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"write_codec_pth needs a flat dict of name -> tensor; got {k!r}: {type(v).__name__}")
        if v.device.type == "meta":
            raise ValueError(f"write_codec_pth: {k} is on the meta device (no data)")
        v = v.detach().cpu()
        if not v.is_contiguous() or v.untyped_storage().nbytes() != v.nbytes:
            v = v.contiguous().clone()
        out[k] = v
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return path
