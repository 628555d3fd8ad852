"""The phase registry is data: every `params/*.yaml` with a top-level `phase:` key is one phase.

Adding a phase = adding a file. The same files feed papermill (`-f params/1b.yaml`) and the CLI
(`fishlab quantize --phase 1b`). A file with a `source:` key (gguf | fp8 | gptq) and a `path:` is an *import*:
a published quantization read as a phase-like row (`fishlab.sources.ImportPhase`).

Keys of a phase file: `method` (the number format: int | fp8), `bits`, `group_size`, `target` (slow | all),
`scale_dtype`, and (optional, beyond round-to-nearest):
- `zero_point: true`: asymmetric INT2/3/4 (a zero point per group, docs/packed-format.md version 2);
- `quantizer`: the algorithm that picks the stored values, `rtn` (default), `mse`, `hqq` or `gptq`
  (fishlab/quant/methods.py), with its settings in `quantizer_args` (defaults there);
- `calibration`: the calibration set of a calibrated quantizer, `{tokens: N, ctx: T}` (fishlab/calibration.py);
- `overrides`: a per-tensor list for mixed precision, `{match: <glob on the internal linear name, e.g.
  "layers.3.feed_forward.w2" or "fast_*">, keep: true}` (left as stored) or `{match: ..., <any of method, bits,
  group_size, scale_dtype, zero_point, quantizer, quantizer_args>}`. The first override that matches a linear
  decides it (it may also quantize a linear outside the target); other linears follow the phase.
- `spare`: `{<projection>: N, ...}`, e.g. `{w2: 7, wo: 2}` (baicai1145/s2-pro-w4a16's recipe): keep the N
  slow-AR linears of that projection that are most sensitive *on the checkpoint being quantized* in bf16. Which
  ones is measured, not typed: `allocate.resolve_spare` quantizes the phase without `spare`, ranks the
  projection's linears by ΔKL on calibration text (`fishlab.sensitivity`, one linear per group) and turns the
  phase into an ordinary one with `keep` overrides (recorded under `allocation:`). `workbook.run_phase` and
  `fishlab quantize` resolve it; sizes need no resolution (a projection's slow-AR linears share one shape).
- `allocation`: what the bit allocator recorded when it wrote the file (fishlab/allocate.py); informative.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

METHODS = ("fp8", "int")
INT_BITS = (2, 3, 4, 8)
TARGETS = ("slow", "all")
SCALE_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZERS = ("rtn", "mse", "hqq", "gptq")
ZERO_POINT_BITS = (2, 3, 4)
OVERRIDE_KEYS = ("method", "bits", "group_size", "scale_dtype", "zero_point", "quantizer", "quantizer_args")

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
    zero_point: bool = False    # asymmetric INT2/3/4
    quantizer: str = "rtn"      # rtn | mse | hqq | gptq
    quantizer_args: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    overrides: tuple = ()       # of dicts: {match, keep} or {match, <OVERRIDE_KEYS>}
    allocation: dict | None = None
    spare: dict = field(default_factory=dict)     # {projection: N}: resolved per checkpoint (allocate.resolve_spare)

    @property
    def label(self) -> str:
        kind = "FP8" if self.method == "fp8" else f"INT{self.bits}" + ("a" if self.zero_point else "")
        gran = "row" if self.group_size is None else f"g{self.group_size}"
        extra = "" if self.quantizer == "rtn" else f" {self.quantizer.upper()}"
        mixed = f" +{len(self.overrides)} overrides" if self.overrides else ""
        if self.spare:
            mixed += " spare " + " ".join(f"{p}={n}" for p, n in self.spare.items())
        return f"{self.name} {kind} {gran} {self.target}{extra}{mixed}"

    @property
    def calibrated(self) -> bool:
        """Whether quantizing needs calibration activations (some tensor uses GPTQ)."""
        return self.quantizer == "gptq" or any(o.get("quantizer") == "gptq" for o in self.overrides)

    def tensor_phase(self, name: str, in_target: bool) -> "Phase | None":
        """How this phase treats one linear, by its internal module name (`layers.3.feed_forward.w2`): the first
        override whose `match` fits it decides (None for `keep`); otherwise the phase itself when the linear is
        in the target, else None (stored as it is). The returned phase has no overrides. A phase with `spare`
        decides nothing until resolved (`allocate.resolve_spare`): which linears it keeps depends on the weights."""
        if self.spare:
            raise PhaseError(f"phase {self.name}: `spare` {self.spare} is resolved per checkpoint first "
                             f"(fishlab.allocate.resolve_spare; workbook.run_phase and fishlab quantize do it)")
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o["match"]):
                if o.get("keep"):
                    return None
                return replace(self, overrides=(), **{k: v for k, v in o.items() if k != "match"})
        return replace(self, overrides=()) if in_target and self.overrides else (self if in_target else None)

    def scheme_key(self) -> tuple:
        """What decides a tensor's stored values (not its name, description or target)."""
        return (self.method, self.bits, self.group_size, self.scale_dtype, self.zero_point, self.quantizer,
                json.dumps(self.quantizer_args, sort_keys=True),
                json.dumps(self.calibration, sort_keys=True) if self.calibrated else "")

    @property
    def qmax(self) -> float:
        return 448.0 if self.method == "fp8" else float(2 ** (self.bits - 1) - 1)

    def to_dict(self) -> dict:
        """Plain JSON data (overrides as a list), equal to what quantization.json stores and gives back."""
        d = json.loads(json.dumps(asdict(self)))
        if not d["spare"]:
            del d["spare"]              # phases without it keep the records they had before the key existed
        return d

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
        zp = d.get("zero_point", False)
        need(isinstance(zp, bool), f"zero_point must be true or false, got {zp!r}")
        need(not zp or (method == "int" and bits in ZERO_POINT_BITS),
             f"zero_point needs method int with bits {ZERO_POINT_BITS}, got {method} {bits}")
        quantizer = d.get("quantizer", "rtn")
        need(quantizer in QUANTIZERS, f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        need(quantizer == "rtn" or method == "int", f"quantizer {quantizer} needs method int, got {method}")
        args = d.get("quantizer_args") or {}
        need(isinstance(args, dict), f"quantizer_args must be a mapping, got {args!r}")
        from .quant.methods import check_args
        bad = check_args(quantizer, args)
        need(not bad, f"quantizer_args: {bad}")
        cal = d.get("calibration") or {}
        need(isinstance(cal, dict) and set(cal) <= {"tokens", "ctx", "seed"}
             and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in cal.items() if k != "seed"),
             f"calibration must be a mapping of tokens / ctx (positive integers) and seed, got {cal!r}")
        alloc = d.get("allocation")
        need(alloc is None or isinstance(alloc, dict), "allocation must be a mapping")
        spare = d.get("spare") or {}
        from .manifest import PROJECTIONS
        need(isinstance(spare, dict) and all(k in PROJECTIONS and isinstance(v, int) and not isinstance(v, bool)
                                             and v > 0 for k, v in spare.items()),
             f"spare must map projections ({', '.join(PROJECTIONS)}) to positive counts, e.g. {{w2: 7, wo: 2}}, "
             f"got {spare!r}")
        need(not spare or method == "int", "spare needs method int (it ranks linears by their ΔKL at the phase's "
                                            "own scheme)")
        overrides = d.get("overrides") or []
        need(isinstance(overrides, list), f"overrides must be a list, got {type(overrides).__name__}")
        base = {k: v for k, v in d.items() if k not in ("overrides", "allocation", "spare")}
        for i, o in enumerate(overrides):
            where = f"overrides[{i}]"
            need(isinstance(o, dict) and isinstance(o.get("match"), str) and o["match"],
                 f"{where} needs a 'match' (a glob on linear names, e.g. layers.3.feed_forward.w2)")
            unknown = set(o) - {"match", "keep", *OVERRIDE_KEYS}
            need(not unknown, f"{where}: unknown keys {sorted(unknown)} (known: match, keep, {', '.join(OVERRIDE_KEYS)})")
            if "keep" in o:
                need(o["keep"] is True and set(o) == {"match", "keep"}, f"{where}: keep: true stands alone")
                continue
            cls.from_dict(dict(base, **{k: v for k, v in o.items() if k != "match"}), f"{source}: {where}")
        return cls(name=str(d["phase"]), method=method, bits=int(bits), group_size=group, target=target,
                   scale_dtype=sd, description=str(d.get("description", "")), source=source, zero_point=zp,
                   quantizer=quantizer, quantizer_args=dict(args), calibration=dict(cal),
                   overrides=tuple(dict(o) for o in overrides), allocation=alloc, spare=dict(spare))


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
