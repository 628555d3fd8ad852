"""Prompt building (spec s2pro-model.md §9.2-§9.6): parts, messages, the [C+1, T] input matrix, long-text turns.

A prompt is a list of parts, each either text (`TextPart`) or codec codes (`VQPart`). Every text part is
tokenised ALONE and the id lists are concatenated, so BPE never merges across a part boundary. A VQ part with
codes Q [C, L] gives L columns: row 0 = Q[0] + semantic_begin, rows 1..C = Q. Text columns carry zeros in rows
1..C.

A `Message` renders as: "<|im_start|>" + role + "\\n" + modality marker ("<|voice|>" for a voice-modality
assistant message, else empty), then its own parts, then "<|im_end|>\\n" (each marker optional).

    tok = load_tokenizer(ckpt)
    x = build_tts_prompt(tok, "Hello.", num_codebooks=10)                     # [11, T] int64
    x = build_clone_prompt(tok, "Hello.", [(ref_codes, "Ref transcript")])   # ref_codes [10, L]

The tokenizer only needs `encode(text) -> list[int]` (and `semantic_begin_id` when semantic_begin is not given),
so tests can use a toy tokenizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union

import torch
from torch import Tensor

from . import spec

__all__ = ["TextPart", "VQPart", "Part", "Message", "SPEAKER_TAG", "system_message", "user_message",
           "assistant_voice_message", "open_assistant_prefix", "render_parts", "encode_parts", "tag_reference_texts",
           "conversation", "build_prompt", "build_tts_prompt", "build_clone_prompt", "split_turns", "batch_turns",
           "text_batches", "MAX_TURNS_PER_BATCH"]

SPEAKER_TAG = re.compile(r"<\|speaker:[0-9]+\|>")
MAX_TURNS_PER_BATCH = 5


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True, eq=False)
class VQPart:
    """Codec codes [C, L] (rows c0..c_{C-1}, L frames), integers >= 0."""
    codes: Tensor

    def __post_init__(self):
        c = self.codes
        if not isinstance(c, Tensor) or c.dim() != 2:
            raise ValueError(f"VQ part codes must be a [num_codebooks, L] tensor, got "
                             f"{tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
        if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
            raise ValueError(f"VQ part codes must be integers, got {c.dtype}")
        if c.numel() and int(c.min()) < 0:
            raise ValueError("VQ part codes must be >= 0")


Part = Union[TextPart, VQPart]


@dataclass
class Message:
    role: str
    parts: list = field(default_factory=list)
    modality: str | None = None           # "voice" -> "<|voice|>" after the role line
    add_im_start: bool = True
    add_im_end: bool = True

    def render(self) -> list[Part]:
        out: list[Part] = []
        if self.add_im_start:
            marker = spec.VOICE if self.modality == "voice" else ""
            out.append(TextPart(f"{spec.IM_START}{self.role}\n{marker}"))
        out.extend(self.parts)
        if self.add_im_end:
            out.append(TextPart(f"{spec.IM_END}\n"))
        return out


# ---- the messages of §9.3 / §9.4 / §9.6 ----

def tag_reference_texts(texts: Sequence[str]) -> list[str]:
    """§9.4: text_i unchanged if it already contains a `<|speaker:N|>` tag, else "<|speaker:i|>" + text_i."""
    return [t if SPEAKER_TAG.search(t) else f"<|speaker:{i}|>{t}" for i, t in enumerate(texts)]


def _check_references(references) -> tuple[list[Tensor], list[str]]:
    codes, texts = [], []
    for r in references or []:
        if not isinstance(r, (tuple, list)) or len(r) != 2:
            raise ValueError("each reference must be a (codes [C, L], transcript) pair")
        c, t = r
        if c is not None:
            codes.append(c)
        if t is not None and t != "":
            if not isinstance(t, str):
                raise TypeError(f"reference transcript must be str, got {type(t).__name__}")
            texts.append(t)
    if texts and not codes:
        raise ValueError("reference transcript(s) given without reference audio / codes: cloning needs both")
    if codes and texts and len(codes) != len(texts):
        raise ValueError(f"{len(codes)} reference code blocks but {len(texts)} transcripts; give one transcript "
                         "per reference")
    return codes, texts


def system_message(references=None) -> Message:
    """The system turn: plain TTS (§9.3), or the voice-cloning turn (§9.4) when references hold both codes and
    transcripts. Codes without transcripts fall back to plain TTS (as the reference does); transcripts without
    codes raise ValueError."""
    codes, texts = _check_references(references)
    if not (codes and texts):
        return Message("system", [TextPart(spec.SYSTEM_TTS)])
    ref_codes = torch.cat([torch.as_tensor(c) for c in codes], dim=1)
    return Message("system", [TextPart(spec.SYSTEM_CLONE), TextPart("\n".join(tag_reference_texts(texts))),
                              TextPart(spec.CLONE_SPEECH_HEADER), VQPart(ref_codes)])


def user_message(text: str) -> Message:
    return Message("user", [TextPart(text)])


def assistant_voice_message(codes: Tensor) -> Message:
    """A finished assistant turn holding generated codes [C, N] (iterative prompting, §9.6 step 4)."""
    return Message("assistant", [VQPart(codes)], modality="voice")


def open_assistant_prefix() -> Message:
    """"<|im_start|>assistant\\n<|voice|>" with no end: generation starts right after it."""
    return Message("assistant", [], modality="voice", add_im_end=False)


def conversation(text: str, references=None, history: Sequence[tuple[str, Tensor]] = ()) -> list[Message]:
    """system, then user(batch_k) + assistant voice(codes_k) for each earlier batch, then user(text) and the open
    assistant prefix."""
    msgs = [system_message(references)]
    for prev_text, prev_codes in history:
        msgs += [user_message(prev_text), assistant_voice_message(prev_codes)]
    return msgs + [user_message(text), open_assistant_prefix()]


def render_parts(messages: Sequence[Message]) -> list[Part]:
    return [p for m in messages for p in m.render()]


def encode_parts(tokenizer: Encoder, parts: Sequence[Part], num_codebooks: int, semantic_begin: int) -> Tensor:
    """The [C+1, T] int64 input matrix of `parts`: text parts tokenised one by one (rows 1..C zero), VQ parts as
    L columns (row 0 = c0 + semantic_begin, rows 1..C = codes)."""
    cols: list[Tensor] = []
    for p in parts:
        if isinstance(p, TextPart):
            ids = tokenizer.encode(p.text)
            block = torch.zeros(num_codebooks + 1, len(ids), dtype=torch.long)
            block[0] = torch.tensor(ids, dtype=torch.long)
        elif isinstance(p, VQPart):
            codes = p.codes.to("cpu", torch.long)
            if codes.size(0) != num_codebooks:
                raise ValueError(f"VQ part has {codes.size(0)} codebooks, the model uses {num_codebooks}")
            block = torch.cat([codes[:1] + semantic_begin, codes], dim=0)
        else:
            raise TypeError(f"not a prompt part: {type(p).__name__}")
        cols.append(block)
    if not cols:
        return torch.zeros(num_codebooks + 1, 0, dtype=torch.long)
    return torch.cat(cols, dim=1)


def _semantic_begin(tokenizer, semantic_begin: int | None) -> int:
    if semantic_begin is not None:
        return int(semantic_begin)
    sb = getattr(tokenizer, "semantic_begin_id", None)
    if sb is None:
        raise ValueError("semantic_begin not given and the tokenizer has no semantic_begin_id")
    return int(sb)


def build_prompt(tokenizer: Encoder, text: str, num_codebooks: int = 10, semantic_begin: int | None = None,
                 references=None, history: Sequence[tuple[str, Tensor]] = ()) -> Tensor:
    """[C+1, T] prompt for one text batch: system (plain or cloning), earlier batches (history: (text, codes)),
    then the current batch and the open assistant prefix."""
    return encode_parts(tokenizer, render_parts(conversation(text, references, history)), num_codebooks,
                        _semantic_begin(tokenizer, semantic_begin))


def build_tts_prompt(tokenizer: Encoder, text: str, num_codebooks: int = 10, semantic_begin: int | None = None
                     ) -> Tensor:
    """Plain TTS prompt (§9.3), [C+1, T] int64."""
    return build_prompt(tokenizer, text, num_codebooks, semantic_begin)


def build_clone_prompt(tokenizer: Encoder, text: str, references: Sequence[tuple[Tensor, str]],
                       num_codebooks: int = 10, semantic_begin: int | None = None) -> Tensor:
    """Voice-cloning prompt (§9.4), [C+1, T] int64. references = [(codes [C, L_i], transcript_i), ...]; codes
    are concatenated along time into one VQ part, transcripts speaker-tagged and joined with "\\n". References
    without any transcript give the plain TTS prompt; transcripts without codes raise ValueError."""
    return build_prompt(tokenizer, text, num_codebooks, semantic_begin, references=references)


# ---- long text (§9.6) ----

def split_turns(text: str) -> list[str]:
    """Turns of `text` split on `<|speaker:N|>` tags. Each turn is a tag plus the raw text up to the next tag,
    stripped of leading/trailing whitespace (a space right after the tag stays). Text before the first tag is
    discarded. Without any tag the result is [text], unmodified."""
    tags = list(SPEAKER_TAG.finditer(text))
    if not tags:
        return [text]
    ends = [m.start() for m in tags[1:]] + [len(text)]
    return [text[m.start():end].strip() for m, end in zip(tags, ends)]


def batch_turns(turns: Sequence[str], chunk_length: int = spec.API_CHUNK_LENGTH) -> list[str]:
    """Group turns, in order, into batches joined with "\\n". A new batch starts when the current one already
    holds 5 turns, or when it is non-empty and adding the turn's UTF-8 byte length would make its byte count
    (joining newlines not counted) exceed chunk_length. An oversize turn forms its own batch."""
    batches: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for t in turns:
        n = len(t.encode("utf-8"))
        if len(cur) >= MAX_TURNS_PER_BATCH or (cur and size + n > chunk_length):
            batches.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    if cur:
        batches.append(cur)
    return ["\n".join(b) for b in batches]


def text_batches(text: str, chunk_length: int = spec.API_CHUNK_LENGTH) -> list[str]:
    """split_turns then batch_turns: the text of each generation batch."""
    return batch_turns(split_turns(text), chunk_length)
