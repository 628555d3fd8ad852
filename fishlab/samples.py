"""Audio samples of a run: the reference voice, the base model's samples and each phase's samples, generated
with the same seed and sampling settings, written as wavs and cached so every phase report compares against the
same base.

Layout under a run's work_dir (default renders/<run>/checkpoints):
    samples/reference.wav, reference.json          the cloning reference (given in params, or made by the base model)
    samples/base_tts.wav, base_clone.wav, base.json  the unquantized model's samples (+ their codes)
and under renders/<run>/audio/: <phase>_tts.wav, <phase>_clone.wav (and copies of the base and reference
clips so the run folder is complete on its own).
"""
from __future__ import annotations

import json
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import spec
from .audio import audio_stats, read_audio, write_wav
from .io import atomic_path, write_json_atomic

KINDS = ("tts", "clone")
DEFAULT_UTTERANCES = 2


def utterance_text(tts_text: str | None = None, utterances: int = DEFAULT_UTTERANCES) -> str:
    """What the listening reports speak: `tts_text`, or else the first `utterances` Harvard sentences (IEEE 1969,
    `fishlab.textdata`) as one text; it is also the reference of their word error rate."""
    from .textdata import harvard_sentences
    return tts_text or " ".join(harvard_sentences(utterances))


@dataclass(frozen=True)
class SampleSettings:
    """What a sample depends on; two runs with equal settings share cached base samples."""
    text: str = field(default_factory=utterance_text)
    reference_text: str = spec.NARRATION
    reference_wav: str | None = None       # a user-given reference; None = made once by the base model
    seed: int = 0
    temperature: float = spec.API_TEMPERATURE
    top_p: float = spec.API_TOP_P
    top_k: int = spec.DEFAULT_TOP_K
    max_new_tokens: int = spec.API_MAX_NEW_TOKENS
    chunk_length: int = spec.API_CHUNK_LENGTH
    dtype: str = "float32"
    compile: bool = False                  # torch.compile the decode steps (fishlab.generate, compile=True)

    def key(self, source: str) -> dict:
        return dict(asdict(self), source=source)

    def sampling(self) -> dict:
        return dict(seed=self.seed, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                     max_new_tokens=self.max_new_tokens, chunk_length=self.chunk_length, compile=self.compile)


@contextmanager
def threads_for(model: torch.nn.Module):
    """One torch thread for demo-sized models: their matmuls are too small to gain from a second thread, and
    thread hand-offs dominate on a shared 2-core machine. Larger models keep torch's default."""
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    old = torch.get_num_threads()
    if n < 50_000_000:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_dtype(model_dtype: str | None, ckpt: str | Path) -> str:
    """The dtype samples run in: the one asked for, else float32 for the synthetic demo (tiny; exact on CPU) and
    the checkpoint's own dtype (bfloat16 for S2 Pro: 9 GB instead of 18 GB) for real weights."""
    if model_dtype:
        if model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model_dtype must be float32, bfloat16 or float16, got {model_dtype!r}")
        return model_dtype
    from .config import load_transformer_config
    from .demo import is_synthetic
    return "float32" if is_synthetic(ckpt) else load_transformer_config(ckpt).dtype


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_stack(ckpt: str | Path, dtype: str = "float32", device: str | None = None):
    """(model, codec, tokenizer) of a checkpoint directory (plain or quantized)."""
    from .model import load_codec, load_transformer
    from .tokenizer import load_tokenizer
    dt = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return (load_transformer(ckpt, device=device, dtype=dt), load_codec(ckpt, device=device),
            load_tokenizer(ckpt))


def synthesize_pair(model, codec, tok, settings: SampleSettings, reference: Path, out_dir: Path,
                    name: str) -> dict:
    """<name>_tts.wav (no reference) and <name>_clone.wav (cloned from `reference`), with their codes and
    per-sample facts: audio stats, frames, end-to-end frames/s and real-time factor, peak RSS."""
    from .tts import synthesize
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    with threads_for(model):
        for kind in KINDS:
            ref = dict(reference=str(reference), reference_text=settings.reference_text) if kind == "clone" else {}
            t0 = time.perf_counter()
            audio, codes, info = synthesize(model, codec, tok, settings.text, **ref, **settings.sampling())
            elapsed = time.perf_counter() - t0
            wav = out_dir / f"{name}_{kind}.wav"
            write_wav(wav, audio, codec.sample_rate)
            with atomic_path(out_dir / f"{name}_{kind}.codes.safetensors") as tmp:
                save_file({"codes": codes.contiguous()}, str(tmp))
            result[kind] = {
                "wav": str(wav), "frames": info["frames"], "stop_reason": info["stop_reason"],
                "seconds": info["seconds"], "elapsed_s": elapsed,
                "frames_per_s": info["frames"] / elapsed if elapsed > 0 else None,
                "real_time_factor": elapsed / info["seconds"] if info["seconds"] else None,
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_vram_bytes": (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                                    and next(model.parameters()).is_cuda else None),
                "stats": audio_stats(audio, codec.sample_rate), "warnings": info["warnings"],
            }
    return result


def load_codes(wav: str | Path) -> torch.Tensor:
    return load_file(str(Path(wav).with_suffix(".codes.safetensors")))["codes"]


def _cached(path: Path, key: dict) -> dict | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    ok = data.get("key") == key and all(Path(s["wav"]).exists() for s in data.get("samples", {}).values())
    return data if ok else None


def reference_sample(src: Path, work_dir: Path, settings: SampleSettings, stack=None) -> dict:
    """The cloning reference: the user's wav, or one made once by the base model from the narration text."""
    d = Path(work_dir) / "samples"
    if settings.reference_wav:
        p = Path(settings.reference_wav).expanduser().resolve()
        if not p.exists():
            raise FileNotFoundError(f"reference_wav not found: {p}")
        audio = read_audio(p)
        return {"wav": str(p), "text": settings.reference_text, "given": True, "stats": audio_stats(audio, 44100)}
    key = settings.key(str(src))
    meta = d / "reference.json"
    if (data := _cached(meta, key)) is not None:
        return data["reference"]
    from .tts import synthesize
    model, codec, tok = stack or load_stack(src, settings.dtype)
    with threads_for(model):
        audio, _, info = synthesize(model, codec, tok, settings.reference_text, **settings.sampling())
    d.mkdir(parents=True, exist_ok=True)
    wav = d / "reference.wav"
    write_wav(wav, audio, codec.sample_rate)
    ref = {"wav": str(wav), "text": settings.reference_text, "given": False, "frames": info["frames"],
           "stats": audio_stats(audio, codec.sample_rate)}
    write_json_atomic(meta, {"key": key, "reference": ref, "samples": {"reference": ref}})
    return ref


def base_samples(src: Path, work_dir: Path, settings: SampleSettings) -> tuple[dict, dict]:
    """(reference, base samples), generated by the unquantized model once per settings and cached."""
    d = Path(work_dir) / "samples"
    key = settings.key(str(src))
    meta = d / "base.json"
    if (data := _cached(meta, key)) is not None:
        return reference_sample(src, work_dir, settings), data["samples"]
    stack = load_stack(src, settings.dtype)
    ref = reference_sample(src, work_dir, settings, stack)
    samples = synthesize_pair(*stack, settings, Path(ref["wav"]), d, "base")
    write_json_atomic(meta, {"key": key, "samples": samples})
    return ref, samples


def publish(paths: list[str | Path], audio_dir: Path) -> list[Path]:
    """Copy clips into the run's audio/ folder (atomically) so the run folder holds every clip it reports."""
    out = []
    audio_dir.mkdir(parents=True, exist_ok=True)
    for p in map(Path, paths):
        dst = audio_dir / p.name
        if p.resolve() != dst.resolve():
            with atomic_path(dst) as tmp:
                shutil.copyfile(p, tmp)
        out.append(dst)
    return out


def sample_tokens(tok, text: str, codes: torch.Tensor, semantic_begin: int) -> tuple[torch.Tensor, int]:
    """The plain-TTS prompt of `text` followed by frames rebuilt from `codes` [C, N] (row 0 = semantic token id),
    i.e. the token matrix a base sample was generated as; and the prompt length."""
    from .prompt import build_tts_prompt
    C = codes.size(0)
    prompt = build_tts_prompt(tok, text, C, semantic_begin)
    frames = torch.cat([(codes[:1] + semantic_begin), codes], 0).to(prompt.dtype)
    return torch.cat([prompt, frames], 1), prompt.size(1)
