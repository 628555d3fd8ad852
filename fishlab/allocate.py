"""The bit allocator: a size budget in, an ordinary phase file out.

Given measured sensitivities (`fishlab.sensitivity`: ΔKL of each group of linears at each candidate precision)
and a budget (GB for the transformer, or average bits per allocated weight), choose one precision per group -
bf16 (kept as stored) or one of the measured phases (INT8 / INT4 / INT3 / INT2 ...) - that minimises the
predicted KL = the sum of the chosen groups' ΔKL, subject to the bytes fitting the budget.

The predicted KL assumes the groups' effects add up (first order: each ΔKL is measured with the rest of the
model exact); the allocated phase is then measured for real like any phase, and the report shows both.

The choice is a multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into
`resolution` equal units (each option's bytes above the group's smallest option rounded *up* to whole units,
so the result never exceeds the budget; with 4000 units it gives up at most 1/4000 of the slack above the
smallest choice per group to rounding). Bytes come from the
config through `fishlab.sizes` (never typed in): a group at a precision costs what the packed format stores for
its linears, bf16 costs 2 bytes per weight, as `sizes.bf16_estimate` counts kept tensors.

The result is written as a params-style YAML phase file (atomically): the most common chosen precision as the
phase's scheme, one `overrides:` entry per linear that differs (`keep: true` for bf16), and an `allocation:`
record (budget, predicted KL, bytes, the sensitivity it used). It loads with `load_phase` and quantizes like any
phase.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from . import sensitivity as S
from .config import ModelConfig
from .manifest import linear_targets
from .phases import Phase, PhaseError
from .sizes import GB, bf16_estimate, linear_name, phase_estimate, quantized_nbytes

KEEP = "bf16"
METHOD = ("exact multiple-choice knapsack (dynamic programming over the budget in {resolution} units, costs "
          "rounded up) minimising the sum of measured per-group ΔKL")


class AllocationError(ValueError):
    """A budget that cannot be met or inputs that do not fit together; the message says which."""


@dataclass(frozen=True)
class Allocation:
    choice: dict            # group name -> precision (a phase name or "bf16")
    predicted_kl: float
    linear_bytes: int       # bytes of the allocated linears
    budget_bytes: int       # of the allocated linears
    transformer_bytes: int  # the whole transformer (sizes' layout: other tensors as bf16)
    params: int
    resolution: int


def _specs_by_name(cfg: ModelConfig) -> dict:
    return {linear_name(s): s for s in linear_targets(cfg.transformer, "all")}


def group_bytes(cfg: ModelConfig, group: dict, phase: Phase | None) -> int:
    """Bytes of one group's linears at a phase's scheme (None: bf16, as `sizes` counts a kept tensor)."""
    specs = _specs_by_name(cfg)
    total = 0
    for name in group["linears"]:
        s = specs[name]
        if phase is None:
            total += s.numel * 2
        else:
            b = quantized_nbytes(s.shape, phase.method, phase.bits, phase.group_size, phase.scale_dtype,
                                 phase.zero_point)
            total += b["data"] + b["scales"]
    return total


def _fixed_bytes(cfg: ModelConfig, groups: list[dict]) -> int:
    """Transformer bytes outside the allocated linears (embeddings, norms, linears of no group), bf16."""
    return bf16_estimate(cfg, codec_dtype=None).transformer_bytes - sum(group_bytes(cfg, g, None) for g in groups)


def allocate(data: dict, cfg: ModelConfig, budget_gb: float | None = None, budget_bits: float | None = None,
             budget_phase: Phase | None = None, candidates: list[str] | None = None, keep: bool = True,
             resolution: int = 4000) -> Allocation:
    """Choose a precision per group of `data` (sensitivity data) within exactly one budget: `budget_gb` = the
    whole transformer in GB (10^9 bytes; codec not counted), `budget_bits` = average stored bits per allocated
    weight (scales included), `budget_phase` = the transformer size of that phase. `candidates`: the measured
    precisions allowed (default all), plus bf16 unless keep=False."""
    if data.get("format") != S.FORMAT:
        raise AllocationError(f"not sensitivity data (format {data.get('format')!r}, expected {S.FORMAT!r})")
    if sum(x is not None for x in (budget_gb, budget_bits, budget_phase)) != 1:
        raise AllocationError("give exactly one budget: budget_gb, budget_bits or budget_phase")
    phases = {n: Phase.from_dict({"phase": n, **{k: v for k, v in d.items() if k not in ("name", "source")}},
                                 f"sensitivity precision {n}") for n, d in data["precisions"].items()}
    names = list(phases) if candidates is None else list(candidates)
    unknown = [c for c in names if c not in phases]
    if unknown:
        raise AllocationError(f"candidates {unknown} were not measured; the sensitivity data has {list(phases)}")
    groups, table = data["groups"], S.table(data)
    specs = _specs_by_name(cfg)
    for g in groups:
        bad = [n for n in g["linears"] if n not in specs]
        if bad:
            raise AllocationError(f"group {g['name']!r}: linears {bad[:3]} are not in the model "
                                  f"{cfg.name} (sensitivity measured on another model?)")
        missing = [c for c in names if c not in table[g["name"]]]
        if missing:
            raise AllocationError(f"group {g['name']!r} has no measurement at {missing}")
    params = sum(g["params"] for g in groups)
    fixed = _fixed_bytes(cfg, groups)
    if budget_gb is not None:
        if not budget_gb > 0:
            raise AllocationError(f"budget_gb must be positive, got {budget_gb}")
        budget = int(budget_gb * GB) - fixed
        what = f"{budget_gb} GB for the transformer ({fixed / GB:.4f} GB of it is outside the allocated linears)"
    elif budget_bits is not None:
        if not budget_bits > 0:
            raise AllocationError(f"budget_bits must be positive, got {budget_bits}")
        budget = int(budget_bits * params / 8)
        what = f"{budget_bits} bits per weight over {params:,} weights"
    else:
        budget = phase_estimate(cfg, budget_phase, codec_dtype=None).transformer_bytes - fixed
        what = f"the size of phase {budget_phase.name}"

    options = [(c, phases[c]) for c in names] + ([(KEEP, None)] if keep else [])
    cost = np.array([[group_bytes(cfg, g, p) for _, p in options] for g in groups], dtype=np.int64)
    kl = np.array([[table[g["name"]][c] if c != KEEP else 0.0 for c, _ in options] for g in groups])
    if budget < cost.min(axis=1).sum():
        raise AllocationError(f"budget {what} is too small: the smallest choice ({options[int(np.argmin(cost[0]))][0]} "
                              f"everywhere) needs {(cost.min(axis=1).sum() + fixed) / GB:.4f} GB for the transformer")
    # the DP runs over the slack above the smallest choice of every group, so that choice always fits exactly
    floor = cost.min(axis=1, keepdims=True)
    slack = budget - int(floor.sum())
    unit = max(1, math.ceil(slack / resolution))
    units = -(-(cost - floor) // unit)                            # rounded up: never over budget
    cap = slack // unit
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = np.zeros((len(groups), cap + 1), dtype=np.int16)
    for i in range(len(groups)):
        new = np.full(cap + 1, inf)
        for j in range(len(options)):
            u = int(units[i, j])
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = dp[: cap + 1 - u] + kl[i, j]
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        dp = new
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):
        raise AllocationError(f"no choice fits {what}")
    choice, used = {}, 0
    for i in range(len(groups) - 1, -1, -1):
        j = int(picks[i, end])
        choice[groups[i]["name"]] = options[j][0]
        used += int(cost[i, j])
        end -= int(units[i, j])
    choice = {g["name"]: choice[g["name"]] for g in groups}
    return Allocation(choice, float(sum(table[g][c] if c != KEEP else 0.0 for g, c in choice.items())),
                      used, budget, used + fixed, params, resolution)


def allocation_phase(data: dict, alloc: Allocation, name: str, target: str = "slow", description: str = "",
                     budget: dict | None = None) -> dict:
    """The phase file's keys for an allocation: the precision chosen for most weights as the phase's own scheme
    (with `target`), an override per linear whose choice differs, and the `allocation:` record."""
    groups = {g["name"]: g for g in data["groups"]}
    weight = Counter()
    for g, c in alloc.choice.items():
        weight[c] += groups[g]["params"]
    quantized = [c for c, _ in weight.most_common() if c != KEEP]
    if not quantized:
        raise AllocationError("the allocation keeps every linear in bf16: no phase to write (raise no budget, "
                              "or allow fewer bits)")
    main = quantized[0]
    prec = data["precisions"]
    scheme_keys = ("method", "bits", "group_size", "scale_dtype", "zero_point", "quantizer", "quantizer_args",
                   "calibration")
    top = {k: prec[main][k] for k in scheme_keys if k in prec[main]}
    overrides = []
    for g in data["groups"]:
        c = alloc.choice[g["name"]]
        if c == main:
            continue
        for lin in g["linears"]:
            if c == KEEP:
                overrides.append({"match": lin, "keep": True})
            else:
                overrides.append({"match": lin, **{k: prec[c][k] for k in scheme_keys if k != "calibration"
                                                   and k in prec[c] and prec[c][k] != top.get(k)}})
    counts = Counter(alloc.choice.values())
    out = {"phase": name,
           "description": description or (f"mixed precision from measured sensitivity: "
                                          + ", ".join(f"{n} x {c}" for c, n in counts.most_common())),
           **{k: v for k, v in top.items() if k != "calibration" or v},
           "target": target,
           "overrides": overrides,
           "allocation": {"method": METHOD.format(resolution=alloc.resolution), "budget": budget or {},
                          "budget_linear_bytes": alloc.budget_bytes, "linear_bytes": alloc.linear_bytes,
                          "transformer_bytes": alloc.transformer_bytes,
                          "bits_per_weight": 8 * alloc.linear_bytes / alloc.params,
                          "predicted_kl": alloc.predicted_kl, "choice": dict(alloc.choice),
                          "candidates": {c: prec[c].get("name", c) for c in prec},
                          "sensitivity": {"model": data.get("model"), "tokens": data.get("tokens")}}}
    Phase.from_dict(out, f"allocated phase {name}")          # it must load as any phase file does
    return out


def write_phase_file(path: str | Path, keys: dict) -> Path:
    """Write a phase file (YAML) atomically; it is validated first and read back once written."""
    from .io import atomic_path
    from .phases import load_phase
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise PhaseError(f"{path}: a phase file ends in .yaml or .yml")
    Phase.from_dict(keys, str(path))
    header = ("# Written by fishlab allocate (fishlab/allocate.py): a mixed-precision phase chosen from measured\n"
              "# sensitivity. The `allocation:` record says how; edit with care, or re-run the allocator.\n")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(header + yaml.safe_dump(keys, sort_keys=False, width=120), encoding="utf-8")
    load_phase(path)
    return path


def choice_rows(data: dict, choice: dict) -> list[dict]:
    """Rows for `plots.heatmap` of the chosen precisions: one per linear, metric `bits` (16 for bf16)."""
    prec = data["precisions"]
    out = []
    for g in data["groups"]:
        c = choice[g["name"]]
        bits = 16 if c == KEEP else prec[c]["bits"]
        for layer in g["layers"] or [None]:
            out.append({"component": g["component"], "layer": layer, "projection": g["projection"], "bits": bits,
                        "precision": c})
    return out


def spare_most_sensitive(data: dict, like: Phase, spare: dict[str, int], name: str, precision: str | None = None,
                         description: str = "") -> dict:
    """The phase file's keys for "`like`, with the most sensitive linears of some projections kept in bf16"
    (baicai1145/s2-pro-w4a16 keeps seven w2 and two wo: spare={"w2": 7, "wo": 2}). The linears are ranked by
    ΔKL at `precision` (default: the last measured one); `data` must be measured one linear per group
    (layers_per_group=1), so each override names one linear."""
    prec = precision or list(data["precisions"])[-1]
    if prec not in data["precisions"]:
        raise AllocationError(f"precision {prec!r} was not measured; the sensitivity data has {list(data['precisions'])}")
    wide = [g["name"] for g in data["groups"] if len(g["linears"]) != 1]
    if wide:
        raise AllocationError(f"sparing single linears needs sensitivity per linear (layers_per_group 1); groups "
                              f"such as {wide[0]!r} hold several")
    by_name = {g["name"]: g for g in data["groups"]}
    ranked = [(g, v) for g, v in S.ranking(data, prec) if by_name[g]["component"] == "slow_ar"]
    overrides, record = [], {}
    for proj, n in spare.items():
        picked = [g for g, _ in ranked if by_name[g]["projection"] == proj][:n]
        if len(picked) < n:
            raise AllocationError(f"asked to spare {n} {proj} linears, the sensitivity data has {len(picked)}")
        record[proj] = [{"linear": by_name[g]["linears"][0], "delta_kl": S.table(data)[g][prec]} for g in picked]
        overrides += [{"match": by_name[g]["linears"][0], "keep": True} for g in picked]
    keys = {k: v for k, v in like.to_dict().items()
            if k in ("method", "bits", "group_size", "target", "scale_dtype", "zero_point", "quantizer",
                     "quantizer_args") or (k == "calibration" and v)}
    out = {"phase": name, "description": description or (
        f"{like.label.split(' ', 1)[1]}, the most sensitive " + " and ".join(f"{n} {p}" for p, n in spare.items())
        + " kept in bf16"), **keys, "overrides": overrides,
        "allocation": {"method": f"spare the linears with the largest measured ΔKL at {prec}, per projection",
                       "spared": record, "like": like.name,
                       "sensitivity": {"model": data.get("model"), "tokens": data.get("tokens")}}}
    Phase.from_dict(out, f"phase {name}")
    return out


SPARE_SENSITIVITY = {"chunks": 1, "ctx": 256, "frames": 32}     # calibration text the ranking is measured on


def resolve_spare(src: str | Path, phase: Phase, work_dir: str | Path, progress=None) -> Phase:
    """A phase with `spare: {projection: N}` made ordinary for the checkpoint `src`: the phase without `spare`
    (its own scheme and quantizer) is quantized into work_dir as `<name>-unspared` (or an earlier complete one
    reused), the ΔKL of each slow-AR linear of the spared projections is measured alone on calibration text
    (`sensitivity.from_checkpoint`, one linear per group), and the N most sensitive per projection become `keep`
    overrides, ahead of the phase's own. Returns the resolved Phase (its `allocation:` record: the ΔKL of each
    kept linear, the unresolved phase). Writes the sensitivity and the resolved phase file into work_dir
    (atomically) so the choice can be read and re-used."""
    from dataclasses import replace

    from .io import write_json_atomic
    if not phase.spare:
        return phase
    work_dir = Path(work_dir)
    like = replace(phase, name=f"{phase.name}-unspared", spare={})
    data = S.from_checkpoint(src, [like], work_dir, layers_per_group=1, progress=progress,
                             projections=list(phase.spare), **SPARE_SENSITIVITY)
    write_json_atomic(work_dir / f"{phase.name}.sensitivity.json", data)
    have = Counter(g["projection"] for g in data["groups"])
    spare = {p: min(n, have[p]) for p, n in phase.spare.items()}
    if spare != phase.spare and progress:
        progress(f"spare {phase.spare}: this model has only {dict(have)} such slow-AR linears; keeping all of those")
    keys = spare_most_sensitive(data, like, spare, phase.name, like.name, phase.description)
    keys["overrides"] = keys["overrides"] + [dict(o) for o in phase.overrides]
    keys["allocation"].update({"from": phase.to_dict(), "asked": dict(phase.spare), "available": dict(have)})
    resolved = Phase.from_dict(keys, f"{phase.source or phase.name} (spare resolved on {src})")
    write_phase_file(work_dir / f"{phase.name}.resolved.yaml", keys)
    return resolved
