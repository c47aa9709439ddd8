"""A reader for the numeric matrices of MATLAB v5 `.mat` files, as SVHN ships them; nothing else.

The format ("MAT-File Format", The MathWorks, 2019, chapter 1): a 128-byte header (text, version
0x0100, endianness "IM"/"MI"), then data elements, each a tag (type, byte count; or a "small"
tag packing both in 4 bytes with up to 4 data bytes) followed by its data padded to 8 bytes. A
top-level element is a matrix (miMATRIX: array flags, dimensions, name, real part) or the zlib
stream of one (miCOMPRESSED). Values are stored column-major, often in a smaller type than the
matrix's class (MATLAB stores a double matrix of small integers as uint8).

Only numeric, real, non-sparse matrices are read; cell arrays, structs, objects, strings, sparse
and complex matrices are refused by name. Bytes are only ever copied into numpy arrays: nothing
in the file can run code. Every length is checked against the bytes present, and decompression is
capped at `max_bytes` per variable so that a small file cannot inflate without bound.
"""

from __future__ import annotations

import zlib

import numpy as np

from phalanx.data.errors import DataError

HEADER_BYTES = 128
MI_MATRIX, MI_COMPRESSED = 14, 15
# Data types of the real part, by miTYPE code.
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
# Numeric matrix classes (mxCLASS codes 6-15) and the numpy type of each.
_MX_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MX_NAMES = {1: "cell array", 2: "struct", 3: "object", 4: "char array", 5: "sparse matrix"}
_COMPLEX_FLAG = 0x08


def read_mat_v5(raw: bytes, source: str, wanted: tuple[str, ...], *, max_bytes: int
                ) -> dict[str, np.ndarray | None]:
    """Every variable name in the file, mapped to its array (shape as MATLAB's) when it is in `wanted`.

    Variables not wanted are skipped unread (None). Raises DataError naming `source`, the place
    and what was expected for a file that is not MAT v5, truncated, or holds a wanted variable
    that is not a real numeric matrix.
    """
    order = _header(raw, source)
    found: dict[str, np.ndarray | None] = {}
    buf = memoryview(raw)  # slices of a memoryview share its bytes: no copies of the large values
    pos = HEADER_BYTES
    while pos < len(buf):
        mdtype, data, _ = _element(buf, pos, len(buf), order, f"{source}: top-level element at byte {pos}")
        where = f"{source}: matrix at byte {pos}"
        pos += 8 + len(data)  # top-level elements follow each other unpadded (as MATLAB and scipy write them)
        if mdtype == MI_COMPRESSED:
            inner = _inflate(data, f"{source}: compressed element at byte {pos - 8 - len(data)}", max_bytes)
            where = f"{source}: compressed matrix at byte {pos - 8 - len(data)}"
            mdtype, data, _ = _element(memoryview(inner), 0, len(inner), order, where)
        if mdtype != MI_MATRIX:
            raise DataError(f"{where}: element of type {mdtype}, expected a matrix (type {MI_MATRIX}) or a "
                            f"compressed one (type {MI_COMPRESSED}); not a MAT v5 file of the expected kind")
        name, array = _matrix(data, order, where, wanted)
        found[name] = array
    return found


def _header(raw: bytes, source: str) -> str:
    """The byte order ('<' or '>') of a MAT v5 file, after checking its header."""
    if len(raw) < HEADER_BYTES or not raw.startswith(b"MATLAB"):
        raise DataError(f"{source}: not a MATLAB .mat file (no 128-byte 'MATLAB ...' header); "
                        "expected a MAT v5 file")
    endian = raw[126:128]
    if endian not in (b"IM", b"MI"):
        raise DataError(f"{source}: endian indicator {endian!r}, expected b'IM' or b'MI'; not a MAT v5 file")
    order = "<" if endian == b"IM" else ">"
    version = int.from_bytes(raw[124:126], "little" if order == "<" else "big")
    if version != 0x0100:
        hint = " (a v7.3 file, which is HDF5)" if version == 0x0200 else ""
        raise DataError(f"{source}: MAT file version 0x{version:04x}{hint}; only MAT v5 (0x0100) is read, "
                        "as the official SVHN files are")
    return order


def _element(buf: memoryview, pos: int, end: int, order: str, where: str) -> tuple[int, bytes, int]:
    """(type, data, position after the 8-byte padding) of the data element whose tag is at `pos`.

    The element must lie within buf[:end] (its file, or the matrix that holds it).
    """
    if end - pos < 8:
        raise DataError(f"{where}: {max(end - pos, 0)} bytes left where a tag needs 8; the file is truncated "
                        "or corrupted")
    first, second = np.frombuffer(buf, dtype=f"{order}u4", count=2, offset=pos).tolist()
    if first >> 16:  # small data element: byte count in the upper half, up to 4 data bytes in the tag
        nbytes = first >> 16
        if nbytes > 4:
            raise DataError(f"{where}: a small element of {nbytes} bytes (at most 4); the file is corrupted")
        return first & 0xFFFF, buf[pos + 4:pos + 4 + nbytes], pos + 8
    if second > end - pos - 8:
        raise DataError(f"{where}: an element of {second} bytes at byte {pos}, {end - pos - 8} are left; "
                        "the file is truncated or corrupted")
    return first, buf[pos + 8:pos + 8 + second], min(pos + 8 + -(-second // 8) * 8, end)


def _matrix(body: memoryview, order: str, where: str, wanted: tuple[str, ...]
            ) -> tuple[str, np.ndarray | None]:
    """(name, array, or None when not wanted) of the matrix whose content (after its tag) is `body`."""
    mdtype, flags, pos = _element(body, 0, len(body), order, f"{where}: array flags")
    if mdtype != 6 or len(flags) != 8:
        raise DataError(f"{where}: array flags of type {mdtype} and {len(flags)} bytes, expected uint32 "
                        "(type 6) and 8 bytes; the file is corrupted")
    word = int(np.frombuffer(flags, dtype=f"{order}u4", count=1)[0])
    mx_class, flag_bits = word & 0xFF, (word >> 8) & 0xFF
    mdtype, dims_raw, pos = _element(body, pos, len(body), order, f"{where}: dimensions")
    if mdtype != 5 or not dims_raw or len(dims_raw) % 4:
        raise DataError(f"{where}: dimensions of type {mdtype} and {len(dims_raw)} bytes, expected int32 "
                        "(type 5); the file is corrupted")
    dims = tuple(np.frombuffer(dims_raw, dtype=f"{order}i4").tolist())
    mdtype, name_raw, pos = _element(body, pos, len(body), order, f"{where}: name")
    if mdtype != 1:
        raise DataError(f"{where}: name of type {mdtype}, expected int8 (type 1); the file is corrupted")
    name = bytes(name_raw).decode("ascii", errors="replace")
    if name not in wanted:
        return name, None
    what = f"{where.split(': ', 1)[0]}: variable {name!r}"
    if mx_class not in _MX_DTYPES:
        kind = _MX_NAMES.get(mx_class, f"matrix of class {mx_class}")
        raise DataError(f"{what} is a {kind}, expected a numeric matrix")
    if flag_bits & _COMPLEX_FLAG:
        raise DataError(f"{what} is complex, expected a real matrix")
    if any(d < 0 for d in dims):
        raise DataError(f"{what} has dimensions {dims}; the file is corrupted")
    mdtype, data, _ = _element(body, pos, len(body), order, f"{what}'s values")
    if mdtype not in _MI_DTYPES:
        raise DataError(f"{what}: values of data type {mdtype}, expected a numeric type "
                        f"({', '.join(map(str, sorted(_MI_DTYPES)))})")
    stored = np.dtype(_MI_DTYPES[mdtype]).newbyteorder(order)
    count = int(np.prod(dims))
    if len(data) != count * stored.itemsize:
        raise DataError(f"{what}: {len(data)} bytes of values, expected {' x '.join(map(str, dims))} = "
                        f"{count} values of {stored.itemsize} bytes; the file is truncated or corrupted")
    values = np.frombuffer(data, dtype=stored).astype(_MX_DTYPES[mx_class])  # native order, the class's type
    return name, values.reshape(dims, order="F")


def _inflate(data: memoryview, where: str, max_bytes: int) -> bytes:
    """The zlib stream `data` decompressed; refuses one damaged, cut short or larger than `max_bytes`."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise DataError(f"{where}: not a valid zlib stream ({exc}); the file is corrupted") from None
    if len(out) > max_bytes:
        raise DataError(f"{where} decompresses to more than {max_bytes} bytes, more than the data "
                        "expected here; refusing to read it")
    if not inflater.eof:
        raise DataError(f"{where}: the compressed data end early; the file is truncated or corrupted")
    return out
