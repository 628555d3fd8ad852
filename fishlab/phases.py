"""The phase registry is data: every `params/*.yaml` with a top-level `phase:` key is one phase.

Adding a phase = adding a file. The same files feed papermill (`-f params/1b.yaml`) and the CLI
(`fishlab quantize --phase 1b`). A file with a `source:` key (gguf | fp8 | gptq) and a `path:` is an *import*:
a published quantization read as a phase-like row (`fishlab.sources.ImportPhase`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

METHODS = ("fp8", "int")
INT_BITS = (2, 3, 4, 8)
TARGETS = ("slow", "all")
SCALE_DTYPES = ("float32", "bfloat16", "float16")

REPO_ROOT = Path(__file__).resolve().parents[1]


class PhaseError(ValueError):
    """An unknown phase or a phase file with bad fields; the message names the file."""


@dataclass(frozen=True)
class Phase:
    name: str
    method: str                 # "fp8" | "int"
    bits: int
    group_size: int | None      # None = one scale per output row
    target: str                 # "slow" | "all"
    scale_dtype: str = "float32"
    description: str = ""
    source: str = ""            # the params file it came from

    @property
    def label(self) -> str:
        kind = "FP8" if self.method == "fp8" else f"INT{self.bits}"
        gran = "row" if self.group_size is None else f"g{self.group_size}"
        return f"{self.name} {kind} {gran} {self.target}"

    @property
    def qmax(self) -> float:
        return 448.0 if self.method == "fp8" else float(2 ** (self.bits - 1) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "phase") -> "Phase":
        def need(cond, msg):
            if not cond:
                raise PhaseError(f"{source}: {msg}")

        need(isinstance(d, dict) and "phase" in d, "no top-level 'phase' key")
        method = d.get("method")
        need(method in METHODS, f"method must be one of {METHODS}, got {method!r}")
        bits = d.get("bits", 8 if method == "fp8" else None)
        if method == "fp8":
            need(bits == 8, f"fp8 phases have bits: 8, got {bits!r}")
        else:
            need(bits in INT_BITS, f"int bits must be one of {INT_BITS}, got {bits!r}")
        group = d.get("group_size")
        need(group is None or (isinstance(group, int) and group > 0),
             f"group_size must be null (per row) or a positive integer, got {group!r}")
        need(method != "fp8" or group is None, "fp8 phases are per-row (group_size: null)")
        target = d.get("target")
        need(target in TARGETS, f"unknown target {target!r}; known targets: {', '.join(TARGETS)}")
        sd = d.get("scale_dtype", "float32")
        need(sd in SCALE_DTYPES, f"scale_dtype must be one of {SCALE_DTYPES}, got {sd!r}")
        return cls(name=str(d["phase"]), method=method, bits=int(bits), group_size=group, target=target,
                   scale_dtype=sd, description=str(d.get("description", "")), source=source)


def parse_phase(d: dict, source: str = "phase"):
    """A Phase, or an ImportPhase when the keys have a (non-null) `source:`."""
    if isinstance(d, dict) and d.get("source") is not None:
        from .sources import ImportPhase
        return ImportPhase.from_dict(d, source)
    return Phase.from_dict(d, source)


def default_params_dir() -> Path:
    return REPO_ROOT / "params"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise PhaseError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise PhaseError(f"{path}: not UTF-8 text ({e.reason})") from None
    return data if isinstance(data, dict) else {}


def phase_files(params_dir: str | Path | None = None) -> dict[str, tuple[Path, dict]]:
    """{phase name: (file, its keys)} for every *.yaml / *.yml in params_dir with a top-level `phase` key,
    each validated as a Phase; sorted by name. A phase defined twice is an error."""
    d = Path(params_dir) if params_dir else default_params_dir()
    if not d.is_dir():
        raise PhaseError(f"{d}: params directory not found")
    found: dict[str, tuple[Path, dict]] = {}
    for p in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
        data = _read_yaml(p)
        if "phase" not in data:
            continue
        name = parse_phase(data, str(p)).name
        if name in found:
            raise PhaseError(f"phase {name!r} is defined twice: {found[name][0]} and {p}")
        found[name] = (p, data)
    return dict(sorted(found.items()))


def load_phases(params_dir: str | Path | None = None, imports: bool = False) -> list[Phase]:
    """Every quantization phase defined in params_dir, sorted by name (with imports=True the import files too)."""
    out = [parse_phase(data, str(p)) for p, data in phase_files(params_dir).values()]
    return out if imports else [p for p in out if isinstance(p, Phase)]


def load_phase(name_or_path: str | Path, params_dir: str | Path | None = None) -> Phase:
    """A phase by name (looked up in params_dir) or by the path of its YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return parse_phase(_read_yaml(p), str(p))
    phases = {ph.name: ph for ph in load_phases(params_dir, imports=True)}
    try:
        return phases[str(name_or_path)]
    except KeyError:
        raise PhaseError(f"unknown phase {str(name_or_path)!r}; known phases: {', '.join(phases) or 'none'} "
                         f"(from {params_dir or default_params_dir()})") from None
