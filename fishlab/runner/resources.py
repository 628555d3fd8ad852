"""What a report asks of a cluster: the `resources:` keys of a run file, their defaults and checks, and the
submitit parameters they become (SLURM's sbatch options, or a local job's limits).

    run:
      resources: {partition: gpu, account: proj}        # defaults of every report of the run
      notebooks:
        - notebook: 10_phase
          for_each_phase: true
          resources: {mem_gb: 96, sbatch: {constraint: a100}}   # this entry's reports

A report's resources, later wins: the built-in defaults (PHASE_RESOURCES for `for_each_phase` entries, the ones
that load and run the model; LIGHT_RESOURCES otherwise) < `run.resources` < the entry's `resources`. The local
executor ignores them.
"""
from __future__ import annotations

import math
from typing import Any

# A phase report on real S2 Pro holds the bf16 transformer (9.1 GB) and the phase's quantized copy on one GPU
# at once (fidelity compares them token by token), streams the 9.1 GB of shards through the page cache while
# quantizing, and generates every sample with the 4.56B model: one GPU, host memory for a bf16 copy, a
# quantized copy, the fp32 codec and the page cache, and hours rather than minutes. Not measured on a cluster
# yet (no CUDA run of the workbook so far): sized with margin, meant to be overridden.
PHASE_RESOURCES: dict[str, Any] = {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 240}
# The other reports read side files and quantized checkpoints (a few tensors at a time): no GPU.
LIGHT_RESOURCES: dict[str, Any] = {"gpus_per_node": 0, "cpus_per_task": 4, "mem_gb": 32, "timeout_min": 60}

RESOURCE_KEYS = {
    "gpus_per_node": "GPUs of the job's node (0: none)",
    "cpus_per_task": "CPU cores",
    "mem_gb": "host memory in GB",
    "timeout_min": "time limit in minutes (SLURM rounds up to whole minutes)",
    "partition": "SLURM partition (null: the cluster's default)",
    "account": "SLURM account (null: your default)",
    "sbatch": "extra sbatch options, e.g. {qos: high, constraint: a100, exclusive: true}",
    "setup": "shell lines run before the job, e.g. ['module load cuda/12.4']",
}


class ResourceError(ValueError):
    """A malformed `resources:` mapping (the planner turns it into a RunnerError naming the file)."""


def check_resources(value: Any, where: str) -> dict[str, Any]:
    """A checked copy of one `resources:` mapping (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ResourceError(f"{where}: 'resources' must be a mapping of {', '.join(RESOURCE_KEYS)}")
    unknown = set(value) - set(RESOURCE_KEYS)
    if unknown:
        raise ResourceError(f"{where}: unknown resource(s) {', '.join(sorted(map(str, unknown)))}; "
                            f"known: {', '.join(RESOURCE_KEYS)}")
    out = dict(value)
    for k in ("gpus_per_node", "cpus_per_task"):
        v = out.get(k)
        if k in out and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "gpus_per_node" else 1)):
            raise ResourceError(f"{where}: resources.{k} must be a whole number "
                                f"{'>= 0' if k == 'gpus_per_node' else '>= 1'}, got {v!r}")
    for k in ("mem_gb", "timeout_min"):
        v = out.get(k)
        if k in out and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ResourceError(f"{where}: resources.{k} must be a positive number, got {v!r}")
    for k in ("partition", "account"):
        if out.get(k) is not None and not isinstance(out[k], str):
            raise ResourceError(f"{where}: resources.{k} must be a string or null, got {out[k]!r}")
    sb = out.get("sbatch")
    if sb is not None and (not isinstance(sb, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in sb.items())):
        raise ResourceError(f"{where}: resources.sbatch must map option names to values, got {sb!r}")
    st = out.get("setup")
    if st is not None and (not isinstance(st, list) or not all(isinstance(x, str) for x in st)):
        raise ResourceError(f"{where}: resources.setup must be a list of shell lines, got {st!r}")
    return out


def report_resources(heavy: bool, run_level: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """One report's resources: built-in defaults < run.resources < the entry's resources."""
    return {**(PHASE_RESOURCES if heavy else LIGHT_RESOURCES), **run_level, **entry}


def signal_delay_s(timeout_min: float) -> int:
    """How long before its time limit a job is warned (SIGUSR2, which submitit turns into an exception in the
    job): enough to shut the kernel down, mark and render the notebook; a quarter of short limits."""
    return int(min(90, max(5, timeout_min * 60 / 4)))


def slurm_parameters(res: dict[str, Any], job_name: str, after: list[str]) -> dict[str, Any]:
    """`submitit.SlurmExecutor.update_parameters` keywords for one report; `after` are job ids it waits for
    (afterany: a report that reads others' side files runs once they ended, whatever their status)."""
    p: dict[str, Any] = {
        "job_name": job_name,
        "time": int(math.ceil(res["timeout_min"])),
        "mem": f"{int(res['mem_gb'])}GB" if float(res["mem_gb"]).is_integer() else f"{int(res['mem_gb'] * 1024)}MB",
        "cpus_per_task": res["cpus_per_task"],
        "signal_delay_s": signal_delay_s(res["timeout_min"]),
    }
    if res.get("gpus_per_node"):
        p["gpus_per_node"] = res["gpus_per_node"]
    for k in ("partition", "account"):
        if res.get(k):
            p[k] = res[k]
    if res.get("setup"):
        p["setup"] = list(res["setup"])
    extra = dict(res.get("sbatch") or {})
    if after:
        extra["dependency"] = "afterany:" + ":".join(after)
    if extra:
        p["additional_parameters"] = extra
    return p


def local_parameters(res: dict[str, Any]) -> dict[str, Any]:
    """`submitit.LocalExecutor.update_parameters` keywords: the time limit (fractions of a minute allowed) and
    the GPUs it sees (CUDA_VISIBLE_DEVICES = the first `gpus_per_node`; none for light reports)."""
    p: dict[str, Any] = {"timeout_min": float(res["timeout_min"]), "gpus_per_node": res.get("gpus_per_node") or 0,
                         "signal_delay_s": signal_delay_s(res["timeout_min"])}
    if res.get("setup"):
        p["setup"] = list(res["setup"])
    return p
