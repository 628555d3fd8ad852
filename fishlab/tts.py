"""Text to speech end to end: text -> batches -> sampled frames -> codes -> one codec decode -> audio.

    from fishlab.model.load import load_transformer
    from fishlab.model.codec_load import load_codec
    from fishlab.tokenizer import load_tokenizer
    from fishlab.tts import synthesize

    audio, codes, info = synthesize(model, codec, tok, "<|speaker:0|>Hello there.", seed=0)
    audio, codes, info = synthesize(model, codec, tok, "Hello.", reference="ref.wav", reference_text="Hi, it's me.")

What happens (spec s2pro-model.md §9.4, §9.6, §8):
1. the reference (a wav path, or a [1, N] / [N] tensor at the codec's sample rate) is read as mono 44.1 kHz and
   encoded with the codec to codes [C, ceil(N / frame_length)];
2. the text is split on `<|speaker:N|>` tags and grouped into batches (`fishlab.prompt.text_batches`);
3. each batch is a fresh generation (full prefill from position 0) whose prompt holds the system turn, every
   earlier batch's user text with its generated codes as an assistant voice message (iterative prompting),
   then the current batch; frames come from `generate_sampled` with ONE generator seeded once for the whole
   text; each batch's codes drop its last frame (§8.4);
4. all batches' codes are concatenated along time and decoded ONCE (the CLI's behaviour; the HTTP server
   decodes per batch instead).

`info` says what was done: mode (tts / clone), the batches (text, prompt columns, frames generated, codes kept,
stop reason "eos" or "length"), total frames, audio seconds, wall time, the sampling values as given and as
rounded to the model dtype, and any warnings (e.g. a reference given without a transcript, which the reference
implementation silently ignores).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from . import spec
from .audio import read_audio
from .generate import (SamplingParams, as_model_scalar, frames_to_codes, generate_sampled, make_generator,
                       stop_reason)
from .prompt import build_prompt, text_batches

__all__ = ["prompt_limit", "encode_reference", "generate_long", "synthesize"]


def prompt_limit(max_seq_len: int) -> int:
    """Longest prompt the long-text driver accepts: max_seq_len - 2048 (S2 Pro: 32768 - 2048 = 30720), leaving
    room for a batch of frames. For small test models (max_seq_len <= 4096) the reserve is max_seq_len / 2."""
    return max_seq_len - min(2048, max_seq_len // 2)


@torch.inference_mode()
def encode_reference(codec, reference: str | Path | Tensor) -> Tensor:
    """Reference audio -> codes [C, ceil(N / frame_length)] (int64, CPU). A path is read with `read_audio`
    (mono mixdown, resampled to the codec's rate); a tensor ([N], [1, N] or [1, 1, N]) must already be mono at
    the codec's sample rate."""
    if isinstance(reference, (str, Path)):
        audio = read_audio(reference, codec.sample_rate)
    elif isinstance(reference, Tensor):
        audio = reference.detach()
        if audio.dim() == 3 and audio.shape[:2] == (1, 1):
            audio = audio[0]
        if audio.dim() == 1:
            audio = audio[None]
        if audio.dim() != 2 or audio.size(0) != 1:
            raise ValueError(f"reference tensor must be mono [1, N] (at {codec.sample_rate} Hz), got shape "
                             f"{tuple(reference.shape)}")
        if not bool(torch.isfinite(audio).all()):
            raise ValueError("reference audio contains NaN or Inf")
    else:
        raise TypeError(f"reference must be a path or a tensor, got {type(reference).__name__}")
    n = audio.size(-1)
    if n == 0:
        raise ValueError("reference audio has no samples")
    codes = codec.encode(audio.reshape(1, 1, -1))[0]
    length = int(codec.code_lengths(torch.tensor([n]))[0])
    return codes[:, :length].to("cpu", torch.long)


@torch.inference_mode()
def generate_long(model, tokenizer, text: str, references: Sequence[tuple[Tensor, str]] | None = None,
                  seed: int | None = 0, temperature: float = spec.API_TEMPERATURE, top_p: float = spec.API_TOP_P,
                  top_k: int = spec.DEFAULT_TOP_K, max_new_tokens: int = spec.API_MAX_NEW_TOKENS,
                  chunk_length: int = spec.API_CHUNK_LENGTH, generator: torch.Generator | None = None,
                  compile: bool = False) -> tuple[Tensor, list[dict]]:
    """Codes [C, N_total] for `text` (batched per §9.6, iterative prompting) and one info dict per batch
    (text, prompt_columns, frames_generated, codes, stop). One generator (seeded once) drives every batch.
    compile: torch.compile the decode steps (`generate`)."""
    cfg = model.cfg
    SamplingParams(temperature, top_p, top_k)                    # validate before any work
    if not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive int (bytes), got {chunk_length!r}")
    if tokenizer.semantic_begin_id != cfg.semantic_begin_id:
        raise ValueError(f"tokenizer's <|semantic:0|> is id {tokenizer.semantic_begin_id} but the model's "
                         f"config says {cfg.semantic_begin_id}")
    if generator is None:
        generator = make_generator(model.device, seed)
    limit = prompt_limit(cfg.max_seq_len)
    history: list[tuple[str, Tensor]] = []
    batches: list[dict] = []
    all_codes: list[Tensor] = []
    for batch_text in text_batches(text, chunk_length):
        prompt = build_prompt(tokenizer, batch_text, cfg.num_codebooks, cfg.semantic_begin_id, references, history)
        if prompt.size(1) > limit:
            raise ValueError(f"prompt of {prompt.size(1)} columns exceeds the limit of {limit} "
                             f"(max_seq_len {cfg.max_seq_len}); shorten the text or the reference")
        t0 = time.perf_counter()
        frames = generate_sampled(model, prompt, max_new_tokens, temperature, top_p, top_k, generator=generator,
                                  compile=compile)
        elapsed = time.perf_counter() - t0
        codes = frames_to_codes(frames).to("cpu", torch.long)
        history.append((batch_text, codes))
        all_codes.append(codes)
        batches.append({"text": batch_text, "prompt_columns": int(prompt.size(1)),
                        "frames_generated": int(frames.size(1)), "codes": int(codes.size(1)),
                        "stop": stop_reason(frames, cfg.eos_token_id), "generate_s": round(elapsed, 4)})
    codes = torch.cat(all_codes, dim=1) if all_codes else torch.zeros(cfg.num_codebooks, 0, dtype=torch.long)
    return codes, batches


@torch.inference_mode()
def synthesize(model, codec, tokenizer, text: str, reference: str | Path | Tensor | None = None,
               reference_text: str | None = None, seed: int | None = 0,
               temperature: float = spec.API_TEMPERATURE, top_p: float = spec.API_TOP_P,
               top_k: int = spec.DEFAULT_TOP_K, max_new_tokens: int = spec.API_MAX_NEW_TOKENS,
               chunk_length: int = spec.API_CHUNK_LENGTH, compile: bool = False) -> tuple[Tensor, Tensor, dict]:
    """Speech for `text`: (audio [1, N] float32 on the CPU at codec.sample_rate, codes [C, N_frames] int64,
    info). N = N_frames * codec.frame_length (no trimming). Voice cloning when both `reference` and
    `reference_text` are given; a reference without a transcript is ignored (plain TTS, as the reference
    implementation does; recorded in info["warnings"]); a transcript without audio is a ValueError."""
    t_start = time.perf_counter()
    cfg = model.cfg
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty")
    if codec.n_codebooks != cfg.num_codebooks:
        raise ValueError(f"codec has {codec.n_codebooks} codebooks, the model {cfg.num_codebooks}")
    has_ref_text = reference_text is not None and reference_text != ""
    if has_ref_text and reference is None:
        raise ValueError("reference_text given without reference audio: cloning needs both")
    params = SamplingParams(temperature, top_p, top_k)
    notes: list[str] = []
    references = None
    ref_frames = 0
    if reference is not None and not has_ref_text:
        msg = "reference audio given without reference_text: ignored, plain TTS (spec §9.4)"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    elif reference is not None:
        ref_codes = encode_reference(codec, reference)
        ref_frames = int(ref_codes.size(1))
        references = [(ref_codes, reference_text)]
    codes, batches = generate_long(model, tokenizer, text, references, seed, temperature, top_p, top_k,
                                   max_new_tokens, chunk_length, compile=compile)
    if codes.size(1) == 0:
        notes.append("no codes were generated (each batch's last frame is dropped): empty audio")
        audio = torch.zeros(1, 0, dtype=torch.float32)
    else:
        audio = codec.decode(codes[None])[0].to("cpu", torch.float32)
    if not bool(torch.isfinite(audio).all()):
        notes.append("decoded audio contains NaN or Inf")
    stops = [b["stop"] for b in batches]
    info = {
        "mode": "clone" if references else "tts",
        "frames": int(codes.size(1)),
        "n_batches": len(batches),
        "batches": batches,
        "stop_reason": "eos" if stops and all(s == "eos" for s in stops) else "length",
        "samples": int(audio.size(1)),
        "sample_rate": int(codec.sample_rate),
        "seconds": audio.size(1) / codec.sample_rate,
        "elapsed_s": round(time.perf_counter() - t_start, 4),
        "reference_frames": ref_frames,
        "seed": seed,
        "sampling": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                     "temperature_used": float(as_model_scalar(params.temperature, model.dtype)),
                     "top_p_used": float(as_model_scalar(params.top_p, model.dtype)),
                     "max_new_tokens": max_new_tokens, "chunk_length": chunk_length},
        "decode": "all batches' codes concatenated, decoded once",
        "warnings": notes,
    }
    return audio, codes, info
