"""`fishlab upload`: a quantized checkpoint (a fishlab phase output, or an exported .gguf) staged as the exact
folder that would go to the Hugging Face hub, with a generated model card; uploaded only when asked.

    staged = stage("work/phase-1b", "me/s2-pro-int4", staging)     # folder + README.md + samples/ (a dry run)
    upload(staged, private=True)                                    # huggingface_hub: create_repo + upload_folder

The card is a `huggingface_hub.ModelCard` whose YAML is a `ModelCardData` (base model, licence as the base
model states it, tags), and whose text gives the scheme in words, the size against bf16, the fidelity numbers
of the phase report (teacher-forced KL / top-1, WER, speaker similarity) with their date and fishlab's
version, the samples, and how to load it. fishlab never stores a token: upload uses the user's normal
huggingface_hub login. A checkpoint made from fishlab's synthetic demo is staged with a SYNTHETIC warning
and uploads only with allow_synthetic=True.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

from .. import __version__, spec
from ..checkpoint import tree_bytes
from ..config import load_config
from ..demo import SYNTHETIC_NOTE, is_synthetic
from ..io import atomic_dir
from ..phases import Phase
from ..quant.apply import read_quantization
from ..sizes import bf16_estimate

CARD_FILE = "README.md"
RESULTS_FILE = "fishlab_results.json"
SAMPLES_DIR = "samples"


class HubError(ValueError):
    """Nothing that can be staged or uploaded as asked; the message says what to do."""


def _repo_name(repo: str) -> tuple[str, str]:
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(c in repo for c in " \\:"):
        raise HubError(f"repo must be ORG/NAME, got {repo!r}")
    return parts[0], parts[1]


# ----------------------------------------------------------------------------------------------------
# what is being uploaded
# ----------------------------------------------------------------------------------------------------

def describe(checkpoint: Path) -> dict:
    """kind (fishlab | gguf), the scheme in words, tags, size and the bf16 size of the same model."""
    if checkpoint.is_file() and checkpoint.suffix == ".gguf":
        import gguf
        r = gguf.GGUFReader(checkpoint)
        field = lambda k: r.fields[k].contents() if k in r.fields else None  # noqa: E731
        types: dict[str, int] = {}
        for t in r.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        ftype = field("general.file_type")
        ftype_name = gguf.LlamaFileType(ftype).name if ftype is not None else "unknown"
        desc = field("general.description") or ""
        return {"kind": "gguf", "name": checkpoint.stem, "method_tag": ftype_name.removeprefix("MOSTLY_").lower(),
                "scheme": (f"GGUF ({ftype_name}): {desc}. Tensor types: "
                           + ", ".join(f"{n} x {k}" for k, n in sorted(types.items(), key=lambda kv: -kv[1]))),
                "bytes": checkpoint.stat().st_size, "synthetic": "SYNTHETIC" in desc,
                "bf16_bytes": None, "files": [checkpoint]}
    if not checkpoint.is_dir():
        raise HubError(f"{checkpoint}: not a checkpoint directory or .gguf file")
    q = read_quantization(checkpoint)
    if q is None:
        raise HubError(f"{checkpoint} is not quantized (no {spec.QUANT_FILE}): upload a phase output "
                       f"(fishlab quantize) or an exported .gguf")
    ph = Phase.from_dict({"phase": q["phase"]["name"], **q["phase"]}, str(checkpoint / spec.QUANT_FILE))
    return {"kind": "fishlab", "name": checkpoint.name, "method_tag": "fp8" if ph.method == "fp8" else f"int{ph.bits}",
            "scheme": scheme_words(ph), "phase": ph.to_dict(), "bytes": tree_bytes(checkpoint),
            "synthetic": is_synthetic(checkpoint), "bf16_bytes": bf16_estimate(load_config(checkpoint)).total_bytes,
            "files": sorted(f for f in checkpoint.rglob("*") if f.is_file())}


def scheme_words(ph: Phase) -> str:
    kind = ("FP8 e4m3 (float8_e4m3fn) weights" if ph.method == "fp8"
            else f"INT{ph.bits} symmetric weights in [-{int(ph.qmax)}, {int(ph.qmax)}]")
    gran = "one scale per output row" if ph.group_size is None else f"one scale per {ph.group_size} input features"
    target = {"slow": "the linear weights of every slow-AR layer",
              "all": "every linear of both ARs (slow, fast, fast output)"}[ph.target]
    return (f"fishlab phase {ph.name}: {kind}, {gran} ({ph.scale_dtype} scales), round to nearest, on {target}; "
            f"embeddings (incl. the tied head), norms and the codec as stored. Weight-only: activations stay in "
            f"the model dtype. Packed format: fishlab docs/packed-format.md.")


def find_result(checkpoint: Path, results: Path | None) -> dict | None:
    """The phase report's side file (renders/<run>/<report>.metrics.json) that measured this checkpoint."""
    roots = [results] if results else sorted(Path("renders").glob("*")) if Path("renders").is_dir() else []
    target = str(checkpoint.resolve())
    for root in roots:
        for p in sorted(Path(root).glob("*.metrics.json")):
            try:
                r = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if target in (r.get("quantized_checkpoint"), (r.get("import") or {}).get("path")):
                r["_side_file"] = str(p)
                r["_date"] = _dt.date.fromtimestamp(p.stat().st_mtime).isoformat()
                return r
    return None


# ----------------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------------

def _fmt(v, pct: bool = False) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.4g}"


def fidelity_rows(result: dict) -> list[tuple[str, str]]:
    lst = result.get("listening") or {}
    det = result.get("listening_detail") or {}
    rows = [("slow AR teacher-forced KL (mean)", _fmt(lst.get("slow_kl_mean"))),
            ("slow AR top-1 agreement", _fmt(lst.get("slow_top1"), True)),
            ("fast AR KL (mean, codebooks 1..C-1)", _fmt(lst.get("fast_kl_mean"))),
            ("fast AR top-1 agreement", _fmt(lst.get("fast_top1"), True))]
    wer = det.get("wer") or {}
    if wer.get("skipped", True):
        rows.append(("word error rate", f"not measured: {wer.get('reason', 'no ASR model')}"))
    else:
        rows += [(f"word error rate, {k.replace('_', ' ')}", _fmt(v.get("wer"), True)) for k, v in wer["clips"].items()]
    rows += [("speaker similarity, clone vs reference", _fmt(lst.get("speaker_clone_vs_reference"))),
             ("speaker similarity, tts vs base tts", _fmt(lst.get("speaker_tts_vs_base")))]
    return rows


def sample_files(result: dict | None) -> dict[str, Path]:
    """{name in samples/: wav} of the phase report's clips that still exist."""
    det = (result or {}).get("listening_detail") or {}
    out = {}
    for who, pair in (("", det.get("samples") or {}), ("base_", det.get("base") or {})):
        for kind in ("tts", "clone"):
            wav = (pair.get(kind) or {}).get("wav")
            if wav and Path(wav).is_file():
                out[f"{who}{kind}.wav" if who else f"{result['phase']['name']}_{kind}.wav"] = Path(wav)
    ref = (det.get("reference") or {}).get("wav")
    if ref and Path(ref).is_file():
        out["reference.wav"] = Path(ref)
    return out


def build_card(repo: str, d: dict, result: dict | None, samples: dict[str, Path]):
    from huggingface_hub import ModelCard, ModelCardData

    org, name = _repo_name(repo)
    tags = ["text-to-speech", "quantized", d["method_tag"], "fishlab", "fish-speech", "s2-pro"]
    if d["kind"] == "gguf":
        tags.append("gguf")
    if d["synthetic"]:
        tags.append("synthetic")
    data = ModelCardData(base_model=spec.HUB_BASE_MODEL, license="other", license_name=spec.HUB_LICENSE_NAME,
                         license_link=spec.HUB_LICENSE_LINK, pipeline_tag="text-to-speech", tags=tags,
                         base_model_relation="quantized")
    L = [f"# {name}", ""]
    if d["synthetic"]:
        L += [f"> **SYNTHETIC — not a usable model.** {SYNTHETIC_NOTE} It exists to test the upload path.", ""]
    L += [f"A weight-only quantization of [{spec.HUB_BASE_MODEL}](https://huggingface.co/{spec.HUB_BASE_MODEL}) "
          f"(Fish Audio S2 Pro: DualAR text-to-semantic transformer + modded-DAC codec), made and measured with "
          f"fishlab {__version__}.", "", "## Scheme", "", d["scheme"], "", "## Size", "",
          "| | bytes | GB |", "|---|---:|---:|",
          f"| this repository's model files | {d['bytes']:,} | {d['bytes'] / 1e9:.3f} |"]
    if d["bf16_bytes"]:
        L.append(f"| the same model in bf16 (codec fp32), computed from its config | {d['bf16_bytes']:,} | "
                 f"{d['bf16_bytes'] / 1e9:.3f} |")
        L += ["", f"{d['bf16_bytes'] / d['bytes']:.2f}x smaller than bf16."]
    L += ["", "## Fidelity", ""]
    if result and result.get("listening"):
        src = "the SYNTHETIC demo weights" if result.get("synthetic") else "real weights"
        L += [f"Measured {result['_date']} with fishlab {__version__} against the unquantized model on {src} "
              f"(teacher-forced on the base model's own sample; fishlab's phase report "
              f"`{Path(result['_side_file']).name}`).", "", "| metric | value |", "|---|---:|"]
        L += [f"| {k} | {v} |" for k, v in fidelity_rows(result)]
    else:
        L += ["Not measured for this upload: run fishlab's workbook (the `10_phase` report of this phase) and "
              "pass its run folder with `--results`."]
    if samples:
        L += ["", "## Samples", "", "Same text, seed and sampling settings as the unquantized model (`base_*`):", ""]
        L += [f"- [`{SAMPLES_DIR}/{n}`]({SAMPLES_DIR}/{n})" for n in samples]
    L += ["", "## Use", ""]
    if d["kind"] == "gguf":
        L += [f"One GGUF file in the layout s2.cpp (a ggml runtime for S2 Pro) loads: architecture "
              f"`{spec.GGUF_ARCH}`, the transformer and the codec in one file. Point s2.cpp at "
              f"`{d['files'][0].name}` (see its README for the command). fishlab reads it back as a source for "
              f"its reports: `fishlab run --params params/community/s2pro.yaml` with `source: gguf`."]
    else:
        L += ["With fishlab (installed from its repository):", "", "```python",
              "import torch", "from fishlab.model import load_transformer, load_codec",
              f'model = load_transformer("{name}", dtype=torch.bfloat16)   # packed linears, dequantized on the fly',
              f'codec = load_codec("{name}")', "```", "", "or from the command line:", "", "```bash",
              f'fishlab tts --checkpoint {name} --text "Hello there." --out hello.wav', "```", "",
              "The packed format is documented in fishlab's `docs/packed-format.md` so other tools can read it."]
    L += ["", "## Licence", "",
          f"This is a derivative of {spec.HUB_BASE_MODEL} and is released under the same licence, the "
          f"[{spec.HUB_LICENSE_TITLE}]({spec.HUB_LICENSE_LINK}) (`{spec.HUB_LICENSE_NAME}`): read it before use.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(L))


# ----------------------------------------------------------------------------------------------------
# staging and upload
# ----------------------------------------------------------------------------------------------------

def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)           # a hard link: the staged 5 GB costs no space
    except OSError:
        shutil.copy2(src, dst)


def stage(checkpoint: str | Path, repo: str, staging: str | Path, results: str | Path | None = None) -> dict:
    """Build the exact folder to upload in `staging` (replaced atomically): the model files, README.md (the
    card), samples/ and fishlab_results.json. Returns {staging, files: {path: bytes}, card, synthetic}."""
    checkpoint = Path(checkpoint).expanduser().resolve()
    _repo_name(repo)
    d = describe(checkpoint)
    result = find_result(checkpoint, Path(results) if results else None)
    samples = sample_files(result)
    card = build_card(repo, d, result, samples)
    staging = Path(staging)
    with atomic_dir(staging, overwrite=True) as tmp:
        base = checkpoint if checkpoint.is_dir() else checkpoint.parent
        for f in d["files"]:
            _place(f, tmp / f.relative_to(base))
        for n, wav in samples.items():
            _place(wav, tmp / SAMPLES_DIR / n)
        if result:
            local = ("listening_detail", "checkpoint", "quantized_checkpoint")     # samples and this machine's paths
            keep = {k: v for k, v in result.items() if k not in local and not k.startswith("_")}
            (tmp / RESULTS_FILE).write_text(json.dumps(dict(keep, measured=result["_date"],
                                                            fishlab_version=__version__), indent=2) + "\n")
        card.save(tmp / CARD_FILE)
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    return {"staging": staging, "repo": repo, "files": files, "card": str(card), "synthetic": d["synthetic"],
            "measured": result is not None}


def upload(staged: dict, private: bool = False, allow_synthetic: bool = False) -> str:
    """Create the repo (if needed) and upload the staged folder with huggingface_hub (the user's login).
    Re-running uploads again only what the hub does not already hold (its LFS/Xet storage skips known files)."""
    if staged["synthetic"] and not allow_synthetic:
        raise HubError("refusing to upload a checkpoint made from fishlab's SYNTHETIC demo weights: pass "
                       "--allow-synthetic if that is really what you want")
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(staged["repo"], private=private, exist_ok=True)
    info = api.upload_folder(repo_id=staged["repo"], folder_path=str(staged["staging"]),
                             commit_message=f"Upload with fishlab {__version__}")
    return getattr(info, "commit_url", None) or str(info)
