"""Real text every machine has offline, for the trained model's yardstick and the speech reports.

- Evaluation and calibration prose: CPython's own documentation topics (`pydoc_data.topics`, about 465 kB of
  English in every Python install). The topics are split by name into two disjoint sets, so a method that
  calibrates on text never sees the text it is evaluated on: every 4th topic (sorted by name) is calibration
  text, the rest evaluation text. The text differs slightly between Python versions; `text_info` records the
  version and a digest next to every result.
- The Harvard sentences (IEEE 1969, public domain; lists 1-4, `fishlab/data/harvard.txt`): the utterances the
  listening reports speak and the reference texts of their word error rate.
"""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
CALIBRATION_EVERY = 4


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return dict(sorted(topics.items()))


def _split(which: str) -> list[str]:
    names = list(_topics())
    if which == "calibration":
        return names[CALIBRATION_EVERY - 1::CALIBRATION_EVERY]
    if which == "evaluation":
        return [n for i, n in enumerate(names) if i % CALIBRATION_EVERY != CALIBRATION_EVERY - 1]
    raise ValueError(f"unknown text set {which!r}: evaluation or calibration")


def topic_names(which: str = "evaluation") -> list[str]:
    """The pydoc topics of the evaluation or the calibration set (disjoint, sorted by name)."""
    return _split(which)


def text(which: str = "evaluation") -> str:
    """The prose of one set: its topics joined by blank lines, in name order."""
    t = _topics()
    return "\n\n".join(t[n].strip() for n in _split(which))


def text_info(which: str = "evaluation") -> dict:
    s = text(which)
    return {"set": which, "source": "CPython pydoc_data.topics", "python": platform.python_version(),
            "topics": len(_split(which)), "chars": len(s), "sha256": hashlib.sha256(s.encode()).hexdigest()[:16]}


def token_chunks(ids: list[int], n_chunks: int, ctx: int, bos: int | None = None) -> torch.Tensor:
    """[n_chunks, ctx] consecutive, non-overlapping windows of `ids` from the start (llama.cpp's perplexity
    chunks); with `bos`, each chunk is BOS + ctx-1 text tokens."""
    body = ctx - (bos is not None)
    if body < 2:
        raise ValueError(f"ctx {ctx} is too small")
    need = n_chunks * body
    if len(ids) < need:
        raise ValueError(f"{n_chunks} chunks of {ctx} tokens need {need} text tokens, the text has {len(ids)}")
    x = torch.tensor(ids[:need], dtype=torch.long).view(n_chunks, body)
    if bos is not None:
        x = torch.cat([torch.full((n_chunks, 1), bos, dtype=torch.long), x], dim=1)
    return x


def harvard_sentences(n: int | None = None) -> list[str]:
    """The first n Harvard sentences (all 40 of lists 1-4 when n is None), in list order."""
    lines = [ln.strip() for ln in (DATA / "harvard.txt").read_text(encoding="utf-8").splitlines()]
    sentences = [ln for ln in lines if ln and not ln.startswith("#")]
    if n is not None and not 1 <= n <= len(sentences):
        raise ValueError(f"n must lie in 1..{len(sentences)} (Harvard lists 1-4), got {n}")
    return sentences if n is None else sentences[:n]
