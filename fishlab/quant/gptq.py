"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
2022): round one input column at a time and push its rounding error onto the columns not yet rounded, weighted
by the inverse Hessian of the layer's reconstruction loss. Our implementation of the paper's algorithm.

For a linear ``y = x W^T`` and calibration inputs X [n, cols], the loss ``||X W^T - X W'^T||^2`` has Hessian
``H = 2 X^T X / n`` (fishlab.calibration accumulates it). With ``U`` the upper Cholesky factor of ``H^-1``
(after damping ``H += damp * mean(diag H) * I``), column ``j`` is rounded to ``q_j`` and every later column ``k``
moves by ``-(w_j - q_j) / U[j, j] * U[j, k]``; columns go in blocks of ``block_size`` so the updates of the
columns past a block are one matrix product (the paper's "lazy batch" update). Options:

- ``act_order``: columns in order of decreasing ``diag(H)`` (the inputs with most energy first). The groups
  stay the contiguous column runs of the packed format: their qparams are fixed from the weight before any
  update ("static groups"), so the file, the loader and the kernels are those of every other quantizer.
- without it, a group's qparams are chosen when its first column is reached, from the columns as updated so
  far (the paper's grouped variant); per-row schemes fix them from the whole row first.
- ``qparams``: ``minmax`` (round-to-nearest range) or ``mse`` (fishlab.quant.mse's clip search) per group.

Input columns that never saw a non-zero input (``H[j, j] = 0``) are set to zero, as the paper does.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .grid import codes, from_codes, minmax_qparams
from .mse import mse_qparams
from .primitives import QuantError, Scheme


def _qparams(cols: torch.Tensor, scheme: Scheme, how: str):
    """Qparams [rows] of one group's columns [rows, g]."""
    if how == "mse":
        s, z = mse_qparams(cols.unsqueeze(1), None, scheme)
        return s[:, 0], None if z is None else z[:, 0]
    return minmax_qparams(cols, scheme)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, qparams: str = "minmax", name: str = "<tensor>"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of ``w`` [rows, cols] given ``hessian`` [cols, cols]: returns (``W'`` [rows, cols] float32, the
    dequantized result; ``scale`` [rows, n_groups]; ``zero`` or None), qparams rounded to the scale dtype,
    all on ``w``'s device, so that `primitives.pack_qtensor(W', scale, zero)` stores exactly these codes."""
    rows, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise QuantError(f"{name}: Hessian shape {tuple(hessian.shape)} != ({cols}, {cols}) (the linear's inputs)")
    dev = w.device
    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=dev, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = cols if scheme.group_size is None else scheme.group_size
    n_groups = -(-cols // g)
    scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=dev)
    zero = torch.zeros_like(scale) if scheme.zero_point else None
    static = act_order or scheme.group_size is None
    if static:                                   # every group's qparams from the (dead-zeroed) weight first
        for j in range(n_groups):
            s, z = _qparams(W[:, j * g:(j + 1) * g], scheme, qparams)
            scale[:, j] = s
            if zero is not None:
                zero[:, j] = z
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(cols, device=dev)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // g).tolist()              # the group (in stored order) of each permuted column
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, device=dev)
    try:
        L = torch.linalg.cholesky(H)
        # H^-1 = L^-T L^-1 by one triangular solve (torch.cholesky_inverse is ~100x slower on some CPU builds)
        Linv = torch.linalg.solve_triangular(L, torch.eye(cols, device=dev), upper=False)
        U = torch.linalg.cholesky(Linv.t() @ Linv, upper=True)
    except RuntimeError as e:            # torch.linalg.LinAlgError is a RuntimeError
        raise QuantError(f"{name}: the damped Hessian is not positive definite ({e}); raise gptq damp") from None
    if not static:                               # a group lies inside one block: its columns are up to date
        block_size = -(-block_size // g) * g
    Q = torch.empty_like(W)
    for b0 in range(0, cols, block_size):
        b1 = min(cols, b0 + block_size)
        W1 = W[:, b0:b1].clone()
        E1 = torch.empty_like(W1)
        U1 = U[b0:b1, b0:b1]
        with _one_cpu_thread(dev):
            _columns(W1, E1, U1, Q, b0, g, static, scale, zero, group_of, scheme, qparams)
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    inv = torch.argsort(perm)
    sdt = scheme.torch_scale_dtype
    return Q[:, inv], scale.to(sdt), None if zero is None else zero.to(sdt)


@contextmanager
def _one_cpu_thread(dev: torch.device):
    """The column loop's ops are tiny ([rows] vectors, [rows, block] updates): on the CPU, more torch threads
    only add hand-offs (measured 8x slower with 2 threads on a busy 2-core box); the block products stay
    multi-threaded."""
    old = torch.get_num_threads()
    if dev.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _columns(W1, E1, U1, Q, b0, g, static, scale, zero, group_of, scheme, qparams) -> None:
    """Round the columns of one block in order, each one's error fed to the block's later columns."""
    for i in range(W1.shape[1]):
        j = b0 + i
        if not static and j % g == 0:        # the group starts here: its qparams from the updated columns
            s, z = _qparams(W1[:, i:i + g], scheme, qparams)
            scale[:, j // g] = s
            if zero is not None:
                zero[:, j // g] = z
        k = group_of[j]
        s = scale[:, k]
        z = None if zero is None else zero[:, k]
        col = W1[:, i]
        q = from_codes(codes(col.unsqueeze(-1), s, z, scheme), s, z).squeeze(-1)
        Q[:, j] = q
        err = (col - q) / U1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        E1[:, i] = err
