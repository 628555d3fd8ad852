"""The text tokenizer (spec s2pro-model.md §9.1): a thin wrapper over HF `tokenizers`.

- `tokenizer.json` is loaded with `tokenizers.Tokenizer.from_file`; the side files (tokenizer_config.json,
  chat_template.jinja, ...) are not used: the reference builds prompts itself (fishlab.prompt).
- `encode(text)` never adds special tokens (no BOS/EOS). Added tokens written literally in the text
  (`<|im_start|>`, `<|voice|>`, ...) come out as single ids; anything else (e.g. `<|speaker:0|>`, if it is not
  an added token) is BPE-tokenised as ordinary text.
- The semantic id range is read from the tokenizer itself (the ids of `<|semantic:k|>`), checked to be one
  contiguous block k = 0..N-1, and checked against config.json's semantic_start/end_token_id when the
  directory has one: a disagreement is an error, not a silent pick.

    tok = load_tokenizer("checkpoints/s2-pro")
    tok.encode("<|im_start|>user\\n")   # [151644, 872, 198]
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import spec

__all__ = ["TokenizerError", "TextTokenizer", "load_tokenizer", "semantic_range"]

_SEMANTIC = re.compile(r"<\|semantic:(\d+)\|>\Z")


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable, or inconsistent with the checkpoint's config."""


def semantic_range(vocab: dict[str, int], source: str = "tokenizer") -> tuple[int, int]:
    """(first, last) id of the `<|semantic:k|>` tokens in `vocab` (token -> id). They must exist, be numbered
    k = 0..N-1 without gaps, and sit at consecutive ids first + k."""
    found = {}
    for token, i in vocab.items():
        m = _SEMANTIC.match(token)
        if m:
            found[int(m.group(1))] = i
    if not found:
        raise TokenizerError(f"{source}: has no <|semantic:k|> tokens")
    n = len(found)
    first = found.get(0)
    if first is None or sorted(found) != list(range(n)):
        raise TokenizerError(f"{source}: <|semantic:k|> tokens are not numbered 0..{n - 1}")
    bad = [k for k, i in found.items() if i != first + k]
    if bad:
        k = min(bad)
        raise TokenizerError(f"{source}: <|semantic:{k}|> has id {found[k]}, expected {first + k} "
                             f"(semantic ids must be one contiguous block starting at {first})")
    return first, first + n - 1


class TextTokenizer:
    """A loaded tokenizer.json: `encode`, `decode`, `token_to_id`, and the ids the prompt builder needs."""

    def __init__(self, tokenizer, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.semantic_begin_id, self.semantic_end_id = semantic_range(vocab, source)
        missing = [t for t in (spec.IM_START, spec.IM_END, spec.VOICE) if t not in vocab]
        if missing:
            raise TokenizerError(f"{source}: lacks the special token(s) {missing} every prompt uses")
        self.im_start_id = vocab[spec.IM_START]
        self.im_end_id = vocab[spec.IM_END]
        self.voice_id = vocab[spec.VOICE]

    @property
    def n_semantic(self) -> int:
        return self.semantic_end_id - self.semantic_begin_id + 1

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.source!r}, vocab={self.vocab_size}, "
                f"semantic={self.semantic_begin_id}..{self.semantic_end_id})")


def load_tokenizer(ckpt_dir: str | Path) -> TextTokenizer:
    """The tokenizer of a checkpoint directory (or a tokenizer.json path). When config.json is beside it, its
    semantic_start_token_id / semantic_end_token_id / eos_token_id must agree with the tokenizer."""
    from tokenizers import Tokenizer

    p = Path(ckpt_dir)
    file = p if p.is_file() else p / spec.TOKENIZER_FILE
    if not file.is_file():
        raise TokenizerError(f"{file}: tokenizer file not found (a checkpoint directory must hold "
                             f"{spec.TOKENIZER_FILE})")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for malformed JSON / schema
        raise TokenizerError(f"{file}: cannot load as a tokenizers tokenizer.json ({e})") from None
    result = TextTokenizer(tok, source=str(file))
    config = file.parent / spec.CONFIG_FILE
    if config.is_file():
        check_against_config(result, json.loads(config.read_text()), str(config))
    return result


def check_against_config(tok: TextTokenizer, cfg: dict, source: str = spec.CONFIG_FILE) -> None:
    """Raise TokenizerError when the HF config's special ids disagree with the tokenizer."""
    problems = []
    for key, have in (("semantic_start_token_id", tok.semantic_begin_id),
                      ("semantic_end_token_id", tok.semantic_end_id),
                      ("eos_token_id", tok.im_end_id)):
        if key in cfg and int(cfg[key]) != have:
            what = "<|im_end|>" if key == "eos_token_id" else "the <|semantic:k|> block"
            problems.append(f"{key} = {cfg[key]} but {what} gives {have}")
    if problems:
        raise TokenizerError(f"{tok.source} disagrees with {source}: " + "; ".join(problems))
