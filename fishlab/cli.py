"""`fishlab` command line. One small function pair per verb, registered in COMMANDS:

    COMMANDS["sizes"] = (add_sizes_arguments, cmd_sizes)

`add_*_arguments(parser)` fills the verb's argparse sub-parser; `cmd_*(args) -> int` does the work and
returns the exit status. A user error raises `UserError` (or the runner's `RunnerError`): main prints one
line to stderr and exits 2, no traceback. Exit statuses: 0 ok, 1 the work ran but failed (e.g. a report failed), 2 user error, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

PROG = "fishlab"


class UserError(Exception):
    """A mistake on the command line or in an input file: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# fishlab run
# ----------------------------------------------------------------------------------------------------

def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params/default.yaml", metavar="FILE",
                   help="run file (default: %(default)s)")
    p.add_argument("--run", dest="run_name", metavar="NAME",
                   help="run name, i.e. the folder under renders/ (default: run.name in the params file)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="override the shared 'checkpoint' parameter (a checkpoint directory)")
    p.add_argument("--show-code", action="store_true", help="show code cells in the HTML reports")
    p.add_argument("--only", nargs="+", metavar="REPORT",
                   help="run only these reports (a report name such as 10_phase-1b, or a notebook name "
                        "for all its reports); the index keeps the others from the previous run")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="per-cell execution timeout in seconds (default: none)")
    from .runner.plan import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS,
                   help="where reports run: local (this process, one after another), slurm (one job per report, "
                        "through submitit) or submitit-local (one subprocess job per report, on this machine); "
                        "default: run.executor in the params file, else local")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the previous run's ok reports (same parameters) and run the rest "
                        "(default: on for slurm and submitit-local, off for local)")
    p.add_argument("--notebooks-dir", default="notebooks", metavar="DIR", help="default: %(default)s")
    p.add_argument("--renders-dir", default="renders", metavar="DIR", help="default: %(default)s")


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run

    overrides = {}
    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
        if not ckpt.exists():
            raise UserError(f"checkpoint not found: {ckpt}")
        overrides["checkpoint"] = str(ckpt.resolve())
    result = run(args.params, run_name=args.run_name, notebooks_dir=args.notebooks_dir,
                 renders_dir=args.renders_dir, show_code=args.show_code, only=args.only,
                 overrides=overrides, timeout=args.timeout, executor=args.executor, resume=args.resume)
    return 0 if result.ok else 1


# ----------------------------------------------------------------------------------------------------
# fishlab status
# ----------------------------------------------------------------------------------------------------

def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run name (folder under --renders-dir) or a run folder")
    p.add_argument("--renders-dir", default="renders", metavar="DIR", help="default: %(default)s")
    p.add_argument("--wait", action="store_true", help="keep watching until every job has ended")


def cmd_status(args: argparse.Namespace) -> int:
    from .runner import FAILURE_STATUSES, STATUS_QUEUED, status
    from .runner.results import first_line

    result = status(args.run, args.renders_dir, wait=args.wait)
    width = max((len(r.name) for r in result.reports), default=0)
    for r in result.reports:
        job = f"job {r.job['id']}" if r.job else ""
        dur = f"{r.duration_s:.1f} s" if r.duration_s is not None else ""
        why = f"{r.reason.get('type')}: {first_line(r.reason.get('message'))}" if r.reason else ""
        if r.status == STATUS_QUEUED and not r.job:
            why = "not submitted yet (its runner holds it until what it needs has ended)"
        print(f"{r.name:<{width}}  {r.status:<11}  {job:<14}  {dur:>9}  {why}".rstrip())
    print(f"{result.run_name}: {result.status} -> {result.index_html}")
    failed = any(r.status in FAILURE_STATUSES for r in result.reports if r.name in result.executed)
    return 1 if failed else 0


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
    return v


# ----------------------------------------------------------------------------------------------------
# fishlab quantize
# ----------------------------------------------------------------------------------------------------

def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase", required=True, metavar="NAME|FILE",
                   help="phase name (a params/*.yaml with that 'phase:') or the path of a phase YAML file")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="plain (bf16) checkpoint directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is complete)")
    p.add_argument("--no-metrics", action="store_true", help="skip the per-tensor weight-error metrics (faster)")
    p.add_argument("--device", metavar="DEV", help="quantize and measure each tensor on this device (e.g. cuda); "
                   "default: the CPU streaming path")
    p.add_argument("--params-dir", metavar="DIR", help="where phase names are looked up (default: params/ of the repo)")


def _user_errors():
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .phases import PhaseError
    from .quant.apply import QuantizeError
    return (CheckpointError, ConfigError, PhaseError, QuantizeError, FileExistsError, FileNotFoundError)


def cmd_quantize(args: argparse.Namespace) -> int:
    from .phases import load_phase
    from .quant.apply import quantize_checkpoint

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint not found: {ckpt}")
    try:
        phase = load_phase(args.phase, args.params_dir)
        if phase.spare:     # which linears to keep is measured on this checkpoint first (allocate.resolve_spare)
            from .allocate import AllocationError, resolve_spare
            work = Path(args.out).parent / f".{Path(args.out).name}.spare"
            print(f"phase {phase.name}: spare {phase.spare} - ranking the linears on {ckpt} (work files in {work})",
                  file=sys.stderr)
            try:
                phase = resolve_spare(ckpt, phase, work, progress=lambda m: print(m, file=sys.stderr))
            except AllocationError as e:
                raise UserError(str(e)) from None
            print(f"phase {phase.name}: keeps " + ", ".join(o["match"] for o in phase.overrides if o.get("keep"))
                  + f" (ranking: {work / (phase.name + '.sensitivity.json')}, phase: "
                  f"{work / (phase.name + '.resolved.yaml')})", file=sys.stderr)
            import shutil
            shutil.rmtree(work / f"phase-{phase.name}-unspared", ignore_errors=True)   # the ranking's checkpoint
        r = quantize_checkpoint(ckpt, args.out, phase, overwrite=args.overwrite, with_metrics=not args.no_metrics,
                                progress=sys.stderr.isatty(), device=args.device)
    except _user_errors() as e:
        raise UserError(str(e)) from None
    measured, predicted = r["measured_bytes"], r["predicted"]["total"]
    line = (f"phase {phase.label}: quantized {len(r['tensors'])} tensors of {ckpt} into {args.out}; "
            f"{measured / 1e9:.3f} GB on disk vs {predicted / 1e9:.3f} GB predicted "
            f"({100 * (measured / predicted - 1):+.2f}%), {r['seconds']:.1f} s")
    m = r.get("metrics") or {}
    if m:
        worst = max(m, key=lambda k: m[k]["rel_fro"])
        line += (f"; mean rel. error {sum(v['rel_fro'] for v in m.values()) / len(m):.4f}, "
                 f"worst {worst} ({m[worst]['rel_fro']:.4f})")
    print(line + ".")
    return 0


# ----------------------------------------------------------------------------------------------------
# fishlab sizes
# ----------------------------------------------------------------------------------------------------

def add_sizes_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", metavar="DIR", help="read the config of this checkpoint directory")
    g.add_argument("--preset", metavar="NAME", help="a built-in config: s2-pro (default) or demo")
    p.add_argument("--scale-dtype", choices=("float32", "bfloat16", "float16"),
                   help="override every phase's scale dtype")
    p.add_argument("--json", metavar="FILE", help="also write the whole analysis as JSON")
    p.add_argument("--params-dir", metavar="DIR", help="where the phases are read (default: params/ of the repo)")


def cmd_sizes(args: argparse.Namespace) -> int:
    from .config import load_config, preset
    from .io import write_json_atomic
    from .phases import load_phases
    from .sizes import size_analysis

    try:
        if args.checkpoint is not None:
            if not Path(args.checkpoint).is_dir():
                raise UserError(f"checkpoint not found: {args.checkpoint}")
            cfg = load_config(Path(args.checkpoint))
        else:
            cfg = preset(args.preset or "s2-pro")
        a = size_analysis(cfg, load_phases(args.params_dir), args.scale_dtype)
    except _user_errors() as e:
        raise UserError(str(e)) from None
    print(f"{a['model']}: {a['params']['transformer'] / 1e9:.3f} B transformer params, "
          f"{a['params']['codec'] / 1e6:.1f} M codec params; sizes in GB (1e9 bytes)")
    print(f"{'':8} {'layout':44} {'transformer':>11} {'total':>8} {'vs bf16':>7}")
    for r in a["estimates"]:
        print(f"{r['kind']:8} {r['label']:44} {r['transformer_bytes'] / 1e9:11.3f} {r['total_bytes'] / 1e9:8.3f} "
              f"{r.get('compression_vs_bf16', 1.0):6.2f}x")
    if args.json:
        write_json_atomic(args.json, a)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------------
# fishlab tts
# ----------------------------------------------------------------------------------------------------

def add_tts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (plain or quantized)")
    p.add_argument("--phase", metavar="P", help="quantize the checkpoint with this phase first (cached)")
    p.add_argument("--text", required=True, help="text to speak (<|speaker:N|> tags split turns)")
    p.add_argument("--reference", metavar="WAV", help="reference voice to clone (needs --reference-text)")
    p.add_argument("--reference-text", metavar="TEXT", help="transcript of the reference")
    p.add_argument("--out", required=True, metavar="WAV", help="output wav (32-bit float, 44.1 kHz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="frames per text batch (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode steps (CUDA graphs on a GPU; the first call compiles for minutes)")
    p.add_argument("--work-dir", metavar="DIR", help="where --phase outputs are cached (default: FISHLAB_CACHE)")
    p.add_argument("--params-dir", metavar="DIR", help="where phases are read (default: params/ of the repo)")


def cmd_tts(args: argparse.Namespace) -> int:
    import hashlib

    from .audio import write_wav
    from .demo import cache_dir
    from .phases import load_phase
    from .samples import load_stack
    from .tts import synthesize
    from .workbook import run_phase

    ckpt = Path(args.checkpoint).expanduser().resolve()
    if not ckpt.is_dir():
        raise UserError(f"checkpoint not found: {ckpt}")
    if (args.reference is None) != (args.reference_text is None):
        raise UserError("voice cloning needs both --reference WAV and --reference-text")
    if args.reference is not None and not Path(args.reference).is_file():
        raise UserError(f"reference not found: {args.reference}")
    try:
        if args.phase:
            phase = load_phase(args.phase, args.params_dir)
            work = Path(args.work_dir) if args.work_dir else \
                cache_dir() / "quantized" / hashlib.sha256(str(ckpt).encode()).hexdigest()[:12]
            ckpt = Path(run_phase(ckpt, phase, work, progress=sys.stderr.isatty())["path"])
        model, codec, tok = load_stack(ckpt, args.dtype, args.device)
        audio, codes, info = synthesize(model, codec, tok, args.text, reference=args.reference,
                                        reference_text=args.reference_text, seed=args.seed,
                                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        max_new_tokens=args.max_new_tokens, compile=args.compile)
        write_wav(args.out, audio, codec.sample_rate)
    except (*_user_errors(), ValueError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.out}: {info['seconds']:.2f} s of audio, {info['frames']} frames in {info['n_batches']} "
          f"batch(es), stop: {info['stop_reason']}, {info['elapsed_s']:.1f} s ({info['mode']}, {ckpt.name})")
    for w in info["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------
# fishlab export-gguf
# ----------------------------------------------------------------------------------------------------

def add_export_gguf_arguments(p: argparse.ArgumentParser) -> None:
    from .gguf_layout import TYPES
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="plain (bf16) checkpoint directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--type", choices=list(TYPES), help="GGUF type of the 2-D transformer tensors (default f16)")
    g.add_argument("--phase", metavar="NAME|FILE", help="a fishlab phase, mapped to its nearest GGUF type")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="output file (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new one is complete)")
    p.add_argument("--params-dir", metavar="DIR", help="where phase names are looked up (default: params/ of the repo)")


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from .export.gguf import ExportError, export_gguf
    from .gguf_layout import NoGGUFEquivalent
    from .phases import load_phase

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint not found: {ckpt}")
    try:
        phase = load_phase(args.phase, args.params_dir) if args.phase else None
        r = export_gguf(ckpt, args.out, args.type, phase, overwrite=args.overwrite, progress=sys.stderr.isatty())
    except (*_user_errors(), ExportError, NoGGUFEquivalent) as e:
        raise UserError(str(e)) from None
    types = ", ".join(f"{n} {k}" for k, n in sorted(r["types"].items(), key=lambda kv: -kv[1]))
    print(f"wrote {r['path']}: {r['bytes'] / 1e9:.3f} GB, {r['tensors']} tensors ({types}), {r['seconds']:.1f} s"
          + (f"; {r['mapping']}" if r["mapping"] else ""))
    for name, why in r["fallbacks"].items():
        print(f"  {name}: F16 ({why})")
    for n in r["notes"]:
        print(f"note: {n}")
    return 0


# ----------------------------------------------------------------------------------------------------
# fishlab upload
# ----------------------------------------------------------------------------------------------------

def add_upload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR|FILE.gguf",
                   help="a quantized checkpoint (fishlab quantize output) or an exported .gguf")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the hub repository")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--yes", action="store_true", help="really upload (default: a dry run that only stages)")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="allow uploading a checkpoint made from fishlab's synthetic demo weights")
    p.add_argument("--results", metavar="RUN_DIR",
                   help="the run folder whose phase report measured this checkpoint (default: search renders/*)")
    p.add_argument("--staging", metavar="DIR",
                   help="where the folder is staged (default: FISHLAB_CACHE/hub/ORG--NAME)")


def cmd_upload(args: argparse.Namespace) -> int:
    from .demo import cache_dir
    from .export.hub import HubError, stage, upload

    ckpt = Path(args.checkpoint).expanduser()
    if not ckpt.exists():
        raise UserError(f"checkpoint not found: {ckpt}")
    staging = Path(args.staging) if args.staging else cache_dir() / "hub" / args.repo.replace("/", "--")
    try:
        s = stage(ckpt, args.repo, staging, args.results)
        print(f"staged {len(s['files'])} files for {args.repo} in {s['staging']}:")
        for name, size in s["files"].items():
            print(f"  {size:>15,}  {name}")
        print(f"  {sum(s['files'].values()):>15,}  in all")
        if not s["measured"]:
            print("note: no phase report measured this checkpoint; the card says so (see --results)")
        print("\n----- README.md (model card) -----\n" + s["card"] + "----- end of card -----")
        if s["synthetic"]:
            print("SYNTHETIC: this checkpoint comes from the demo weights; uploading it needs --allow-synthetic")
        if not args.yes:
            print(f"dry run: nothing uploaded; pass --yes to upload to {args.repo}")
            return 0
        url = upload(s, private=args.private, allow_synthetic=args.allow_synthetic)
    except (*_user_errors(), HubError) as e:
        raise UserError(str(e)) from None
    print(f"uploaded: {url}")
    return 0


# ----------------------------------------------------------------------------------------------------
# Registry and entry point
# ----------------------------------------------------------------------------------------------------

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

# ----------------------------------------------------------------------------------------------------
# fishlab sensitivity / fishlab allocate
# ----------------------------------------------------------------------------------------------------

def add_sensitivity_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (S2 Pro or a text LM)")
    g.add_argument("--demo", action="store_true", help="the synthetic S2 Pro demo checkpoint")
    p.add_argument("--phases", nargs="+", default=["2b", "1b", "2c"], metavar="PHASE",
                   help="candidate precisions, as phase names or files (default: %(default)s); default checkpoint: "
                        "the trained proxy model (SmolLM2-135M)")
    p.add_argument("--layers-per-group", type=int, default=5, metavar="N",
                   help="consecutive layers per group of one projection (1 = one linear per group; default 5)")
    p.add_argument("--target", choices=("slow", "all"), default="slow", help="which linears (default: slow)")
    p.add_argument("--chunks", type=int, default=1, help="text LM: calibration chunks (default 1)")
    p.add_argument("--ctx", type=int, default=512, help="text LM: tokens per chunk (default 512)")
    p.add_argument("--frames", type=int, default=32, help="S2 Pro: frames the base generates (default 32)")
    p.add_argument("--work-dir", metavar="DIR", help="where quantized checkpoints go (default: FISHLAB_CACHE/sensitivity)")
    p.add_argument("--out", required=True, metavar="FILE", help="sensitivity JSON to write (atomically)")
    p.add_argument("--params-dir", metavar="DIR", help="where phase names are looked up (default: params/ of the repo)")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .demo import cache_dir, demo_checkpoint
    from .io import write_json_atomic
    from .phases import load_phase
    from .sensitivity import from_checkpoint, ranking
    from .trained import trained_checkpoint

    ckpt = Path(args.checkpoint) if args.checkpoint else demo_checkpoint() if args.demo else trained_checkpoint()
    if not ckpt.is_dir():
        raise UserError(f"checkpoint not found: {ckpt}")
    try:
        phases = [load_phase(p, args.params_dir) for p in args.phases]
        data = from_checkpoint(ckpt, phases, Path(args.work_dir) if args.work_dir else cache_dir() / "sensitivity",
                               args.layers_per_group, args.target, args.chunks, args.ctx, args.frames,
                               progress=lambda m: print(m, file=sys.stderr))
    except (*_user_errors(), ValueError) as e:
        raise UserError(str(e)) from None
    write_json_atomic(args.out, data)
    low = phases[-1].name
    top = ", ".join(f"{g} ({kl:.2e})" for g, kl in ranking(data, low)[:3])
    print(f"sensitivity of {len(data['groups'])} groups x {len(phases)} precisions of {ckpt} -> {args.out} "
          f"({data['seconds']:.1f} s); most sensitive at {low}: {top}.")
    return 0


def add_allocate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sensitivity", required=True, metavar="FILE", help="JSON written by fishlab sensitivity")
    b = p.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget-gb", type=_positive_float, metavar="GB", help="transformer size in GB (10^9 bytes)")
    b.add_argument("--budget-bits", type=_positive_float, metavar="BITS",
                   help="average stored bits per allocated weight (scales included)")
    b.add_argument("--budget-phase", metavar="PHASE", help="the transformer size of this phase (e.g. 1b)")
    b.add_argument("--spare", nargs="+", metavar="PROJ=N",
                   help="no budget: --like PHASE with the N most sensitive linears of each projection kept in bf16 "
                        "(baicai-style: --spare w2=7 wo=2; needs sensitivity with --layers-per-group 1)")
    p.add_argument("--like", metavar="PHASE", help="with --spare: the phase the rest follows (e.g. a g32 INT4 phase)")
    p.add_argument("--candidates", nargs="+", metavar="PHASE", help="measured precisions allowed (default: all)")
    p.add_argument("--no-bf16", action="store_true", help="never keep a linear in bf16")
    p.add_argument("--checkpoint", metavar="DIR", help="config to size from (default: the one the sensitivity was measured on)")
    p.add_argument("--name", required=True, help="the new phase's name")
    p.add_argument("--target", choices=("slow", "all"), default="slow", help="the phase's target (default: slow)")
    p.add_argument("--out", required=True, metavar="FILE", help="phase file to write (.yaml), atomically")
    p.add_argument("--params-dir", metavar="DIR", help="where --budget-phase is looked up (default: params/ of the repo)")


def cmd_allocate(args: argparse.Namespace) -> int:
    import json

    from .allocate import AllocationError, allocate, allocation_phase, spare_most_sensitive, write_phase_file
    from .config import load_config
    from .phases import load_phase

    try:
        data = json.loads(Path(args.sensitivity).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{args.sensitivity}: cannot read sensitivity data ({e})") from None
    if args.spare:
        try:
            spare = {k: int(v) for k, v in (x.split("=", 1) for x in args.spare)}
        except ValueError:
            raise UserError(f"--spare takes PROJ=N pairs (e.g. w2=7 wo=2), got {' '.join(args.spare)}") from None
        if not args.like:
            raise UserError("--spare needs --like PHASE (the scheme of every other linear)")
        try:
            keys = spare_most_sensitive(data, load_phase(args.like, args.params_dir), spare, args.name)
            write_phase_file(args.out, keys)
        except (*_user_errors(), AllocationError) as e:
            raise UserError(str(e)) from None
        print(f"phase {args.name}: {keys['description']} -> {args.out}")
        return 0
    try:
        cfg = load_config(args.checkpoint or data.get("checkpoint") or "")
        bp = load_phase(args.budget_phase, args.params_dir) if args.budget_phase else None
        a = allocate(data, cfg, budget_gb=args.budget_gb, budget_bits=args.budget_bits, budget_phase=bp,
                     candidates=args.candidates, keep=not args.no_bf16)
        budget = {k: v for k, v in (("gb", args.budget_gb), ("bits", args.budget_bits), ("phase", args.budget_phase)) if v}
        keys = allocation_phase(data, a, args.name, args.target, budget=budget)
        write_phase_file(args.out, keys)
    except (*_user_errors(), AllocationError) as e:
        raise UserError(str(e)) from None
    print(f"phase {args.name}: {len(keys['overrides'])} overrides, {8 * a.linear_bytes / a.params:.3f} bits/weight, "
          f"transformer {a.transformer_bytes / 1e9:.4f} GB, predicted KL {a.predicted_kl:.4g} -> {args.out}")
    return 0


COMMANDS: dict[str, Command] = {
    "run": (add_run_arguments, cmd_run),
    "status": (add_status_arguments, cmd_status),
    "quantize": (add_quantize_arguments, cmd_quantize),
    "sizes": (add_sizes_arguments, cmd_sizes),
    "tts": (add_tts_arguments, cmd_tts),
    "export-gguf": (add_export_gguf_arguments, cmd_export_gguf),
    "upload": (add_upload_arguments, cmd_upload),
    "sensitivity": (add_sensitivity_arguments, cmd_sensitivity),
    "allocate": (add_allocate_arguments, cmd_allocate),
}

HELP = {
    "run": "execute the workbook notebooks of a params file and render HTML reports",
    "status": "a run's reports and jobs, without blocking: collects jobs that ended, rewrites its index",
    "quantize": "apply one phase to a checkpoint: a packed, loadable quantized checkpoint directory",
    "sizes": "the size table: every phase and GGUF type, from a config (no weights read)",
    "tts": "speak a text (optionally cloning a reference voice) with a checkpoint, optionally quantized first",
    "export-gguf": "write a plain checkpoint as one GGUF file in the layout s2.cpp loads (f16, q8_0, q4_0, ...)",
    "upload": "stage a quantized checkpoint with a model card for the Hugging Face hub (dry run unless --yes)",
    "sensitivity": "ΔKL of each group of linears (projection x layers) quantized alone, at each candidate precision",
    "allocate": "choose per-tensor precision within a size budget from measured sensitivity: writes a phase file",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="fishlab: quantization workbook for Fish Audio S2 Pro")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add_arguments, handler) in COMMANDS.items():
        doc = HELP.get(name) or (handler.__doc__ or "").strip().splitlines()[0:1]
        sp = sub.add_parser(name, help=doc if isinstance(doc, str) else (doc[0] if doc else None))
        add_arguments(sp)
        sp.set_defaults(_handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .runner import RunnerError

    parser = build_parser()
    args = parser.parse_args(argv)        # usage errors: argparse prints usage + one line and exits 2
    old_term = _sigterm_as_interrupt()
    try:
        return int(args._handler(args) or 0)
    except (UserError, RunnerError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """SIGTERM (CI cancel, `kill`) takes the Ctrl-C path: the runner marks the run interrupted and shuts the
    kernel down (kernels run in their own process group, so a bare SIGTERM would orphan them)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except (ValueError, OSError):     # not the main thread
        return None


if __name__ == "__main__":   # python -m fishlab.cli
    sys.exit(main())
