"""Prompt building (spec s2pro-model.md §9.2-§9.6) and the tokenizer wrapper (§9.1)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from fishlab import spec
from fishlab.config import preset
from fishlab.demo import build_tokenizer
from fishlab.prompt import (TextPart, VQPart, batch_turns, build_clone_prompt, build_prompt, build_tts_prompt,
                            conversation, encode_parts, render_parts, split_turns, tag_reference_texts,
                            text_batches)
from fishlab.tokenizer import TokenizerError, load_tokenizer

C = 10


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """tokenizer.json + config.json of the demo checkpoint (no weights needed here)."""
    d = tmp_path_factory.mktemp("tok")
    cfg = preset("demo")
    build_tokenizer(cfg).save(str(d / spec.TOKENIZER_FILE))
    (d / spec.CONFIG_FILE).write_text(json.dumps(cfg.transformer.to_hf_dict()))
    return d


@pytest.fixture(scope="module")
def tok(demo_dir):
    return load_tokenizer(demo_dir)


def text_of(parts):
    return "".join(p.text if isinstance(p, TextPart) else f"<VQ x{p.codes.shape[1]}>" for p in parts)


# ---- byte-exact strings ----

def spec_tts_template(spec_dir) -> str:
    md = (spec_dir / "s2pro-model.md").read_text()
    sec = md[md.index("### 9.3"):md.index("### 9.4")]
    block = re.search(r"```\n(.*?)\n```", sec, re.S).group(1)
    return block.replace("\\n", "\n")


def test_tts_prompt_string_matches_spec(spec_dir):
    template = spec_tts_template(spec_dir)
    assert "{TEXT}" in template
    text = "Hello, world."
    parts = render_parts(conversation(text))
    assert text_of(parts) == template.replace("{TEXT}", text)
    assert [p.text for p in parts] == [
        "<|im_start|>system\n", "convert the provided text to speech", "<|im_end|>\n", "<|im_start|>user\n", text,
        "<|im_end|>\n", "<|im_start|>assistant\n<|voice|>"]


def test_clone_prompt_string_matches_spec():
    codes = torch.zeros(C, 3, dtype=torch.long)
    parts = render_parts(conversation("Go.", references=[(codes, "Ref text.")]))
    assert text_of(parts) == (
        "<|im_start|>system\nconvert the provided text to speech reference to the following:\n\nText:\n"
        "<|speaker:0|>Ref text.\n\nSpeech:\n<VQ x3><|im_end|>\n<|im_start|>user\nGo.<|im_end|>\n"
        "<|im_start|>assistant\n<|voice|>")
    assert [type(p).__name__ for p in parts] == ["TextPart"] * 4 + ["VQPart"] + ["TextPart"] * 5
    assert parts[2].text == "<|speaker:0|>Ref text."


def test_speaker_tagging_rule():
    assert tag_reference_texts(["a", "b"]) == ["<|speaker:0|>a", "<|speaker:1|>b"]
    assert tag_reference_texts(["x <|speaker:7|>a", "b"]) == ["x <|speaker:7|>a", "<|speaker:1|>b"]
    assert tag_reference_texts(["<|speaker:|>a"]) == ["<|speaker:0|><|speaker:|>a"]     # needs digits
    two = [(torch.zeros(C, 2, dtype=torch.long), "one"), (torch.ones(C, 3, dtype=torch.long), "two")]
    parts = render_parts(conversation("t", references=two))
    assert parts[2].text == "<|speaker:0|>one\n<|speaker:1|>two"
    assert parts[4].codes.shape == (C, 5) and parts[4].codes[:, 2:].eq(1).all()


def test_codes_without_text_fall_back_text_without_codes_errors(tok):
    codes = torch.zeros(C, 4, dtype=torch.long)
    assert torch.equal(build_clone_prompt(tok, "Hi.", [(codes, None)]), build_tts_prompt(tok, "Hi."))
    assert torch.equal(build_clone_prompt(tok, "Hi.", [(codes, "")]), build_tts_prompt(tok, "Hi."))
    with pytest.raises(ValueError, match="without reference audio"):
        build_clone_prompt(tok, "Hi.", [(None, "transcript")])


# ---- tokenisation per part ----

def test_parts_tokenised_separately(tok):
    joint = tok.encode("Hello")
    split = tok.encode("Hel") + tok.encode("lo")
    assert joint != split                            # BPE merges across the boundary when joined
    x = encode_parts(tok, [TextPart("Hel"), TextPart("lo")], C, tok.semantic_begin_id)
    assert x[0].tolist() == split and (x[1:] == 0).all()


def test_tts_prompt_ids_are_per_part_concatenation(tok):
    text = "<|speaker:0|>Hello there."
    x = build_tts_prompt(tok, text, C)
    expected = []
    for p in render_parts(conversation(text)):
        expected += tok.encode(p.text)
    assert x.dtype == torch.long and x.shape == (C + 1, len(expected))
    assert x[0].tolist() == expected and (x[1:] == 0).all()
    assert x[0, -1] == tok.voice_id and x[0, 0] == tok.im_start_id
    assert x[0].tolist().count(tok.im_end_id) == 2


def test_clone_prompt_11_row_layout(tok):
    L = 6
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 100, (C, L), generator=g)
    x = build_clone_prompt(tok, "Good morning!", [(codes, "Hello there, this is me.")], C)
    sb = tok.semantic_begin_id
    sem = ((x[0] >= sb) & (x[0] <= tok.semantic_end_id)).nonzero().flatten()
    head = sum(len(tok.encode(s)) for s in ("<|im_start|>system\n", spec.SYSTEM_CLONE,
                                            "<|speaker:0|>Hello there, this is me.", spec.CLONE_SPEECH_HEADER))
    assert sem.tolist() == list(range(head, head + L))
    assert torch.equal(x[1:, head:head + L], codes)                       # all 10 code rows filled
    assert torch.equal(x[0, head:head + L], codes[0] + sb)
    text_cols = torch.ones(x.shape[1], dtype=torch.bool)
    text_cols[head:head + L] = False
    assert (x[1:, text_cols] == 0).all()                                  # text columns are zero
    assert x[0, head + L] == tok.im_end_id and x[0, -1] == tok.voice_id
    with pytest.raises(ValueError, match="codebooks"):
        build_clone_prompt(tok, "x", [(codes[:4], "t")], C)


def test_iterative_prompting_layout(tok):
    c1 = torch.full((C, 3), 5, dtype=torch.long)
    x = build_prompt(tok, "second", C, history=[("first", c1)])
    parts = render_parts(conversation("second", history=[("first", c1)]))
    assert text_of(parts) == (
        "<|im_start|>system\nconvert the provided text to speech<|im_end|>\n<|im_start|>user\nfirst<|im_end|>\n"
        "<|im_start|>assistant\n<|voice|><VQ x3><|im_end|>\n<|im_start|>user\nsecond<|im_end|>\n"
        "<|im_start|>assistant\n<|voice|>")
    sem = (x[0] >= tok.semantic_begin_id).nonzero().flatten()
    assert len(sem) == 3 and (x[0, sem] == tok.semantic_begin_id + 5).all() and (x[1:, sem] == 5).all()
    assert x[0, sem[0] - 1] == tok.voice_id                               # voice marker right before the codes


# ---- golden A: exact ids with a toy tokenizer rebuilt from the README's position map ----

class ToyTokenizer:
    """Greedy longest match over the pieces of golden A's position map."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.longest = max(map(len, vocab))

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for n in range(min(self.longest, len(text) - i), 0, -1):
                if text[i:i + n] in self.vocab:
                    ids.append(self.vocab[text[i:i + n]])
                    i += n
                    break
            else:
                raise KeyError(f"toy tokenizer cannot encode {text[i:]!r}")
        return ids


def golden_vocab(golden_dir) -> dict[str, int]:
    readme = (golden_dir / "README.md").read_text()
    vocab = {}
    for piece, i in re.findall(r'\d+:"((?:[^"\\]|\\.)*)"=(\d+)', readme):
        vocab[piece.replace("\\n", "\n")] = int(i)
    assert len(vocab) > 30
    return vocab


def test_golden_a_prompt_exact(golden_dir):
    from safetensors.torch import load_file
    g = load_file(str(golden_dir / "transformer" / "golden.safetensors"))
    cfg = json.loads((golden_dir / "transformer" / "config.json").read_text())
    toy = ToyTokenizer(golden_vocab(golden_dir))
    ref = g["reference_codes"]
    n_cb, sb = ref.shape[0], cfg["semantic_start_token_id"]
    text = "<|speaker:0|>Good morning!"
    batches = text_batches(text)
    assert batches == [text]
    x = build_clone_prompt(toy, batches[0], [(ref, "Hello there, this is me.")], n_cb, sb)
    assert torch.equal(x, g["prompt_tokens"])
    sem = ((x[0] >= sb) & (x[0] <= cfg["semantic_end_token_id"])).nonzero().flatten().tolist()
    assert sem == [34, 35, 36, 37, 38, 39]                  # README: semantic positions of the prompt


# ---- §9.6 turns and batches ----

def test_split_turns():
    assert split_turns("intro <|speaker:0|> Hi there. <|speaker:1|>Yo\n") == ["<|speaker:0|> Hi there.",
                                                                              "<|speaker:1|>Yo"]
    assert split_turns("  no tags at all \n") == ["  no tags at all \n"]          # unmodified
    assert split_turns("<|speaker:0|><|speaker:12|>x") == ["<|speaker:0|>", "<|speaker:12|>x"]
    assert split_turns("<|speaker:0|>   ") == ["<|speaker:0|>"]
    assert split_turns("a <|speaker:x|> b") == ["a <|speaker:x|> b"]               # not a tag: no digits


def test_no_tags_single_batch_no_length_chunking():
    long = "word " * 200
    assert text_batches(long, chunk_length=100) == [long]


def test_batch_turns_five_turn_cap():
    turns = [f"<|speaker:{i % 2}|>x" for i in range(12)]
    b = batch_turns(turns, chunk_length=10_000)
    assert [s.count("<|speaker:") for s in b] == [5, 5, 2]
    assert b[0] == "\n".join(turns[:5])


def test_batch_turns_byte_length_rule():
    t = ["a" * 40, "b" * 40, "c" * 21, "d" * 100, "e" * 250, "f"]
    assert batch_turns(t, 100) == ["a" * 40 + "\n" + "b" * 40, "c" * 21, "d" * 100, "e" * 250, "f"]
    assert batch_turns(["a" * 50, "b" * 50], 100) == ["a" * 50 + "\n" + "b" * 50]   # newlines not counted
    # UTF-8 bytes, not characters: "é" is 2 bytes
    assert batch_turns(["é" * 30, "é" * 21], 100) == ["é" * 30, "é" * 21]
    assert batch_turns(["é" * 30, "é" * 20], 100) == ["é" * 30 + "\n" + "é" * 20]
    assert batch_turns([], 100) == []


def test_text_batches_multi_speaker():
    text = "<|speaker:0|>Hello. <|speaker:1|>Hi! <|speaker:0|>How are you?"
    assert text_batches(text, 200) == ["<|speaker:0|>Hello.\n<|speaker:1|>Hi!\n<|speaker:0|>How are you?"]
    assert text_batches(text, 25) == ["<|speaker:0|>Hello.", "<|speaker:1|>Hi!", "<|speaker:0|>How are you?"]


# ---- the tokenizer wrapper ----

def test_tokenizer_basics(tok):
    cfg = preset("demo").transformer
    assert (tok.semantic_begin_id, tok.semantic_end_id) == (cfg.semantic_begin_id, cfg.semantic_end_id)
    assert tok.im_end_id == cfg.eos_token_id
    ids = tok.encode("<|im_start|>user\n<|semantic:3|>")
    assert ids[0] == tok.im_start_id and ids[-1] == cfg.semantic_begin_id + 3
    assert tok.encode("") == []
    assert tok.decode(tok.encode("Hello there.")) == "Hello there."
    assert len(tok.encode("<|speaker:0|>")) > 1                 # not an added token in the demo tokenizer


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_config_disagreement(demo_dir, tmp_path):
    (tmp_path / spec.TOKENIZER_FILE).write_bytes((demo_dir / spec.TOKENIZER_FILE).read_bytes())
    cfg = json.loads((demo_dir / spec.CONFIG_FILE).read_text())
    cfg["semantic_start_token_id"] += 1
    (tmp_path / spec.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="semantic_start_token_id"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_semantic_tokens(tmp_path):
    from tokenizers import Tokenizer, models
    t = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    t.save(str(tmp_path / spec.TOKENIZER_FILE))
    with pytest.raises(TokenizerError, match="semantic"):
        load_tokenizer(tmp_path)


def test_vq_part_validation():
    with pytest.raises(ValueError):
        VQPart(torch.zeros(C, 2))
    with pytest.raises(ValueError):
        VQPart(torch.full((C, 2), -1))
    with pytest.raises(ValueError):
        VQPart(torch.zeros(3, dtype=torch.long))
