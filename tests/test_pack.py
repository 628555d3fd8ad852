import pytest
import torch

from fishlab.quant.pack import (
    BITS,
    PackError,
    bytes_per_unit,
    pack,
    packed_nbytes,
    unpack,
    values_per_unit,
)

INT_BITS = (2, 3, 4, 8)


def _full_range(bits, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    return torch.randint(-half, half, (n,), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("n", list(range(0, 26)) + [127, 128, 129, 1000, 4099])
def test_roundtrip_every_length(bits, n):
    q = _full_range(bits, n, seed=n)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.dim() == 1
    assert p.numel() == packed_nbytes(n, bits)
    r = unpack(p, bits, n)
    assert r.dtype == torch.int8
    assert torch.equal(r, q)


@pytest.mark.parametrize("bits", INT_BITS)
def test_roundtrip_multidim_is_row_major(bits):
    q = _full_range(bits, 7 * 13, seed=1).view(7, 13)
    p = pack(q, bits)
    assert torch.equal(p, pack(q.reshape(-1), bits))
    assert torch.equal(unpack(p, bits, q.numel()).view(7, 13), q)
    # a non-contiguous input is read in its logical row-major order
    qt = q.t()
    assert torch.equal(unpack(pack(qt, bits), bits, qt.numel()).view(13, 7), qt)


def test_roundtrip_large_fast():
    q = _full_range(3, 3_000_001, seed=2)
    assert torch.equal(unpack(pack(q, 3), 3, q.numel()), q)


def test_packed_nbytes_and_units():
    assert [packed_nbytes(n, 4) for n in (0, 1, 2, 3)] == [0, 1, 1, 2]
    assert [packed_nbytes(n, 2) for n in (1, 4, 5, 8)] == [1, 1, 2, 2]
    assert [packed_nbytes(n, 3) for n in (1, 8, 9, 16, 17)] == [3, 3, 6, 6, 9]
    assert packed_nbytes(5, 8) == 5 and packed_nbytes(5, "fp8") == 5
    assert (values_per_unit(3), bytes_per_unit(3)) == (8, 3)
    assert (values_per_unit(4), bytes_per_unit(4)) == (2, 1)
    assert (values_per_unit(2), bytes_per_unit(2)) == (4, 1)
    assert set(BITS) == {2, 3, 4, 8, "fp8"}


# ---- hand-worked byte layouts (offset binary, first value in the low bits)


def test_int4_layout():
    # u = q + 8: -7 -> 1 (low nibble), 7 -> 15 (high nibble)
    assert pack(torch.tensor([-7, 7], dtype=torch.int8), 4).tolist() == [0xF1]
    assert pack(torch.tensor([0, -8, 1], dtype=torch.int8), 4).tolist() == [0x08, 0x09]  # pad nibble 0
    assert pack(torch.tensor([-7], dtype=torch.int8), 4).tolist() == [0x01]


def test_int2_layout():
    # u = q + 2: [-1, 0, 1, -2] -> [1, 2, 3, 0] -> 1 | 2<<2 | 3<<4 | 0<<6
    assert pack(torch.tensor([-1, 0, 1, -2], dtype=torch.int8), 2).tolist() == [0b00_11_10_01]
    assert pack(torch.tensor([1, 1, 1, 1, 0], dtype=torch.int8), 2).tolist() == [0xFF, 0x02]


def test_int3_layout():
    # u = q + 4; eight 3-bit fields of a 24-bit little-endian word
    u = list(range(8))  # q = -4..3
    q = torch.tensor([x - 4 for x in u], dtype=torch.int8)
    word = sum(x << (3 * k) for k, x in enumerate(u))
    assert pack(q, 3).tolist() == list(word.to_bytes(3, "little"))
    assert pack(q, 3).tolist() == [0x88, 0xC6, 0xFA]
    # trailing partial unit: one value, padded with zero bits to 3 bytes
    assert pack(torch.tensor([3], dtype=torch.int8), 3).tolist() == [0x07, 0x00, 0x00]
    assert pack(torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, -3], dtype=torch.int8), 3).tolist() == [
        0x24, 0x49, 0x92, 0x01, 0x00, 0x00,
    ]


def test_int8_and_fp8_bit_views():
    assert pack(torch.tensor([-1, 0, 127, -127], dtype=torch.int8), 8).tolist() == [0xFF, 0x00, 0x7F, 0x81]
    f = torch.tensor([1.0, -2.0, 448.0, 0.0]).to(torch.float8_e4m3fn)
    p = pack(f, "fp8")
    assert p.tolist() == [0x38, 0xC0, 0x7E, 0x00]
    r = unpack(p, "fp8", 4)
    assert r.dtype == torch.float8_e4m3fn and torch.equal(r.float(), f.float())


# ---- errors


@pytest.mark.parametrize("bits,bad", [(4, 8), (4, -9), (2, 2), (2, -3), (3, 4), (3, -5)])
def test_out_of_range_rejected(bits, bad):
    with pytest.raises(PackError, match="out of range"):
        pack(torch.tensor([0, bad], dtype=torch.int8), bits)


def test_wrong_dtypes_and_bits():
    with pytest.raises(PackError):
        pack(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(PackError):
        pack(torch.zeros(4, dtype=torch.int8), "fp8")
    with pytest.raises(PackError):
        pack(torch.zeros(4, dtype=torch.int8), 5)
    with pytest.raises(PackError):
        pack(torch.zeros(4, dtype=torch.int8), True)
    with pytest.raises(PackError):
        unpack(torch.zeros(4, dtype=torch.int8), 4, 8)
    with pytest.raises(PackError, match="expected"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(PackError, match="expected"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3, 8)
    assert issubclass(PackError, ValueError)


# ---- an independent numpy decoder written from docs/packed-format.md alone


def _doc_decode(buf: bytes, bits, numel):
    import numpy as np

    b = np.frombuffer(buf, dtype=np.uint8).astype(np.int64)
    if bits == 8:
        return np.frombuffer(buf, dtype=np.int8)[:numel].astype(np.int64)
    if bits in (2, 4):
        per = 8 // bits
        u = np.stack([(b >> (bits * k)) & ((1 << bits) - 1) for k in range(per)], axis=1)
    else:
        w = b[0::3] | (b[1::3] << 8) | (b[2::3] << 16)
        u = np.stack([(w >> (3 * k)) & 7 for k in range(8)], axis=1)
    return u.reshape(-1)[:numel] - (1 << (bits - 1))


@pytest.mark.parametrize("bits", INT_BITS)
def test_doc_decoder_agrees(bits):
    q = _full_range(bits, 1001, seed=bits)
    p = pack(q, bits)
    assert _doc_decode(p.numpy().tobytes(), bits, 1001).tolist() == q.tolist()
