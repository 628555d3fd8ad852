"""The quantizer's fast paths against their plain references: histogram counts vs torch.histc, in-place packing
vs pack()."""
import math

import pytest
import torch

from fishlab.metrics import histc_counts
from fishlab.quant.pack import pack, pack_float_into, packed_nbytes, values_per_unit


@pytest.mark.parametrize("seed", range(5))
def test_histc_counts_equal_torch_histc_including_bin_edges(seed):
    g = torch.Generator().manual_seed(seed)
    r = 0.75
    bins = 41
    edges = torch.linspace(-r, r, bins + 1)
    x = torch.cat([(torch.rand(5000, generator=g) * 2 - 1) * r, edges, torch.nextafter(edges, torch.zeros(1)),
                   torch.tensor([r, -r, 0.0])]).clamp(-r, r).float()
    assert torch.equal(histc_counts(x, bins, r), torch.histc(x, bins, min=-r, max=r).long())
    acc = torch.zeros(bins, dtype=torch.int64)
    histc_counts(x, bins, r, acc)
    histc_counts(x, bins, r, acc)
    assert torch.equal(acc, 2 * torch.histc(x, bins, min=-r, max=r).long())


@pytest.mark.parametrize("bits", [2, 3, 4, 8, "fp8"])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_float_into_equals_pack(bits, n):
    g = torch.Generator().manual_seed(n)
    if bits == "fp8":
        x = torch.randn(n, generator=g) * 100
        q = x.to(torch.float8_e4m3fn)
    else:
        qmax = 2 ** (bits - 1) - 1
        x = torch.randint(-qmax, qmax + 1, (n,), generator=g).float()
        q = x.to(torch.int8)
    units = math.ceil(n / values_per_unit(bits))
    buf = torch.zeros(units * values_per_unit(bits))
    buf[:n] = x
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    pack_float_into(buf, n, bits, out, torch.empty(units), torch.empty(units, dtype=torch.int32))
    assert torch.equal(out, pack(q, bits))


def test_quantize_after_inference_mode_reuses_no_inference_buffer():
    """The quantizer's reused scratch buffers, first made under torch.inference_mode, still work outside it."""
    from fishlab.quant.primitives import INT4_G128, quantize_tensor
    w = torch.randn(64, 256)
    with torch.inference_mode():
        a = quantize_tensor("w", w, INT4_G128)
    b = quantize_tensor("w", w, INT4_G128)
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
