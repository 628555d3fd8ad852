"""fishlab's own batch-1 CPU GEMV kernels (``gemv.c`` beside this file), built once per machine with the
system C compiler and called through ctypes.

Why our own: at batch 1 on a few cores, torch's CPU kernels (oneDNN's bf16 GEMV, ``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) are compute-bound well below memory speed (about 15-20 GB/s where this
sandbox's two cores read 30-44 GB/s; see benchmarks/README.md), and decoding is nothing but such GEMVs. The
kernels read fishlab's generic packed streams as they are (no torch-internal layout), so they give the same
result on every CPU; the instruction set only decides how fast (``isa()``: AVX-512 BF16 dot products,
AVX-512 VNNI integer dot products for INT8, or the plain C loops the compiler vectorises for the machine).

Build: ``$CC`` (else ``cc`` / ``gcc``) ``-O3 -march=native -fopenmp -shared -fPIC`` into
``$FISHLAB_CACHE`` (default ``~/.cache/fishlab``) as ``gemv-<hash>.so``, the hash covering the source, the
compiler, its flags and this CPU's feature flags; written to a temporary name and renamed. No compiler, a
failed build or ``FISHLAB_CKERNELS=0``: `available()` is False with the reason, logged once, and the linears
take torch's routes (shown as such in `fishlab.model.load.routes`). Not used on CUDA.

A GEMV is run for up to `MAX_ROWS` activation rows (decode); more rows (prefill, teacher forcing) are
compute-bound and go to torch's matmuls.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["available", "reason", "isa", "MAX_ROWS", "build", "gemv_bf16", "gemv_int8", "gemv_int4",
           "dequant_int4", "linear_bf16", "linear_int8", "linear_int4", "disabled", "int4_ok", "library_path"]

log = logging.getLogger("fishlab.cgemv")

MAX_ROWS = 8
SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC")

_state: dict = {}          # "lib" (CDLL or None), "reason", "path"
_off = [False]             # disabled() nesting for tests and benchmarks


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    return cc if cc else (shutil.which("cc") or shutil.which("gcc"))


def _cache_dir() -> Path:
    d = os.environ.get("FISHLAB_CACHE")
    return Path(d) if d else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fishlab"


def build(march: str = "native") -> tuple[ctypes.CDLL | None, str, Path | None]:
    """Compile (or reuse from the cache) gemv.c for `march` -> (library or None, reason, path). The module uses
    ``native``; tests also build a portable target (e.g. ``x86-64-v3``, AVX2) to check the plain C loops on
    every machine."""
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (set CC, or install cc / gcc)", None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {cc!r} does not run ({e})", None
    src = SOURCE.read_bytes()
    last_err = ""
    for omp in (("-fopenmp",), ()):          # without OpenMP (e.g. Apple clang): one thread, still a kernel
        flags = tuple(f"-march={march}" if f == "-march=native" else f for f in FLAGS) + omp
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(),
                                         _cpu_flags().encode(), torch.__version__.encode()])).hexdigest()[:16]
        out = _cache_dir() / f"gemv-{key}.so"
        if not out.exists():
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".gemv-", suffix=".so.partial", dir=out.parent)
            except OSError as e:
                return None, f"cannot write the kernel cache {out.parent} ({e}; set FISHLAB_CACHE)", None
            os.close(fd)
            try:
                r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                   timeout=300)
                if r.returncode != 0:
                    last_err = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
                    last_err = f"{cc} {' '.join(flags)} failed: {last_err[0][:300]}"
                    continue
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            lib = ctypes.CDLL(str(out))
        except OSError as e:
            last_err = f"loading {out} failed: {e}"
            continue
        _declare(lib)
        return lib, "" if omp else "built without OpenMP: one thread", out
    return None, last_err, None


def _declare(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.fl_isa.restype = ctypes.c_int
    lib.fl_gemv_bf16.argtypes = [P, P, P, I, I, I]
    lib.fl_gemv_int8.argtypes = [P, P, P, P, P, I, I, I]
    lib.fl_gemv_int4.argtypes = [P, P, P, P, P, P, P, I, I, I, I]
    lib.fl_dequant_int4.argtypes = [P, P, P, P, I, I, I]
    for f in (lib.fl_gemv_bf16, lib.fl_gemv_int8, lib.fl_gemv_int4, lib.fl_dequant_int4):
        f.restype = None


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        lib, why, path = (None, "FISHLAB_CKERNELS=0", None) if os.environ.get("FISHLAB_CKERNELS", "1") == "0" \
            else build()
        _state.update(lib=lib, reason=why, path=path)
        if lib is None:
            log.warning("fishlab: own CPU GEMV kernels unavailable (%s): linears take torch's CPU routes", why)
        else:
            log.info("fishlab: own CPU GEMV kernels loaded from %s (%s)%s", path, _isa_name(lib.fl_isa()),
                     f"; {why}" if why else "")
    return None if _off[0] else _state["lib"]


def available() -> bool:
    """Whether the kernels are built and loaded (and not switched off by `disabled`)."""
    if "ok" not in _state:
        _state["ok"] = _lib() is not None
    return _state["ok"] and not _off[0]


def reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    _lib()
    return "disabled() in effect" if _off[0] else _state["reason"] if _state["lib"] is None else ""


def _isa_name(bits: int) -> str:
    names = [n for b, n in ((1, "avx512_bf16"), (2, "avx512_vnni")) if bits & b]
    return "+".join(names) or "c"


def isa() -> str:
    """The instruction sets the loaded build uses: ``avx512_bf16`` (bf16 and INT4 dot products),
    ``avx512_vnni`` (INT8 integer dot products), joined by '+'; ``c`` for the plain C loops; ``none``."""
    lib = _lib()
    return "none" if lib is None else _isa_name(lib.fl_isa())


def library_path() -> Path | None:
    _lib()
    return _state.get("path")


@contextmanager
def disabled():
    """Within the block `available()` is False: modules prepared inside take torch's routes (tests compare
    the two; the benchmark times both)."""
    old = _off[0]
    _off[0] = True
    try:
        yield
    finally:
        _off[0] = old


def int4_ok(K: int, group: int) -> bool:
    """The INT4 kernel's shapes: K a multiple of 128, groups a power of two >= 32 dividing K."""
    return K % 128 == 0 and group >= 32 and group & (group - 1) == 0 and K % group == 0


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    return x2 if x2.is_contiguous() else x2.contiguous()


def gemv_bf16(x: torch.Tensor, w: torch.Tensor, lib=None) -> torch.Tensor:
    """``x @ w.T`` for bf16 x [..., K] (at most MAX_ROWS rows) and a row-contiguous bf16 w [N, K]."""
    N, K = w.shape
    x2 = _rows(x, K)
    y = torch.empty(x2.shape[0], N, dtype=torch.bfloat16)
    (lib or _state["lib"]).fl_gemv_bf16(x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], N, K)
    return y.reshape(*x.shape[:-1], N)


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lib=None) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T``: bf16 x [..., K], int8 q [N, K], float32 scale [N]."""
    N, K = q.shape
    x2 = _rows(x, K)
    xf = torch.empty(x2.shape, dtype=torch.float32)
    y = torch.empty(x2.shape[0], N, dtype=torch.bfloat16)
    (lib or _state["lib"]).fl_gemv_int8(x2.data_ptr(), xf.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(),
                               x2.shape[0], N, K)
    return y.reshape(*x.shape[:-1], N)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zc: torch.Tensor, N: int, K: int,
              group: int, lib=None) -> torch.Tensor:
    """INT4 weight-only: bf16 x [..., K], the generic INT4 stream `packed` (N * K / 2 bytes), float32 scale and
    ``zc = scale * (zero + 128)`` [N, K / group]."""
    x2 = _rows(x, K)
    M = x2.shape[0]
    xp = torch.empty(M, K, dtype=torch.bfloat16)
    xs = torch.empty(M, K // group, dtype=torch.float32)
    y = torch.empty(M, N, dtype=torch.bfloat16)
    (lib or _state["lib"]).fl_gemv_int4(x2.data_ptr(), xp.data_ptr(), xs.data_ptr(), packed.data_ptr(), scale.data_ptr(),
                               zc.data_ptr(), y.data_ptr(), M, N, K, group)
    return y.reshape(*x.shape[:-1], N)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, N: int, K: int, group: int,
                 lib=None) -> torch.Tensor:
    """The INT4 weight as bf16 [N, K]: ``(u - zero) * scale`` in float32 (scale, zero float32 [N, K / group])."""
    w = torch.empty(N, K, dtype=torch.bfloat16)
    (lib or _state["lib"]).fl_dequant_int4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), w.data_ptr(), N, K, group)
    return w


# torch.compile(fullgraph=True) cannot trace a ctypes call: under compilation the same kernels run as custom ops
# (a fake implementation gives dynamo the output's shape). Eager calls go straight to ctypes (a custom op's
# dispatch costs about as much as a small GEMV).

@torch.library.custom_op("fishlab::gemv_bf16", mutates_args=())
def _op_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return gemv_bf16(x, w)


@_op_bf16.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("fishlab::gemv_int8", mutates_args=())
def _op_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return gemv_int8(x, q, scale)


@_op_int8.register_fake
def _(x, q, scale):
    return x.new_empty(*x.shape[:-1], q.shape[0])


@torch.library.custom_op("fishlab::gemv_int4", mutates_args=())
def _op_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zc: torch.Tensor, N: int, K: int,
             group: int) -> torch.Tensor:
    return gemv_int4(x, packed, scale, zc, N, K, group)


@_op_int4.register_fake
def _(x, packed, scale, zc, N, K, group):
    return x.new_empty(*x.shape[:-1], N)


def linear_bf16(x, w):
    return _op_bf16(x, w) if torch.compiler.is_compiling() else gemv_bf16(x, w)


def linear_int8(x, q, scale):
    return _op_int8(x, q, scale) if torch.compiler.is_compiling() else gemv_int8(x, q, scale)


def linear_int4(x, packed, scale, zc, N, K, group):
    return _op_int4(x, packed, scale, zc, N, K, group) if torch.compiler.is_compiling() \
        else gemv_int4(x, packed, scale, zc, N, K, group)
