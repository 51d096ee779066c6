"""How a commit's rows reach the store: whole chunks encoded here, the rest through zarr.

Every delta chunk of a chunk-aligned commit is written whole, and the arrays of steps and
examples keep the chunk they are filling in memory (``AppendedRows``), so it too is written
whole. Encoding a whole chunk here, with the array's own codec settings (little-endian bytes,
Blosc, crc32c), gives the very bytes zarr would write (a test compares them) with a fraction of
zarr's Python work per chunk (which holds the GIL that training needs) and no read-back of a
partly written chunk. Arrays with other codecs, and partial delta chunks, go through zarr.
"""

from __future__ import annotations

import asyncio

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype

Encoded = tuple[str, bytes]  # a chunk's key in its array, and its stored bytes

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}  # numcodecs.Blosc.NOSHUFFLE, SHUFFLE, BITSHUFFLE


class ChunkEncoder:
    """Encodes a whole chunk of one array as its codec chain would: bytes, then Blosc (if any), then crc32c."""

    def __init__(self, arr: zarr.Array, blosc: numcodecs.Blosc | None) -> None:
        self._arr = arr
        self._blosc = blosc
        self._dtype = np.dtype(arr.dtype).newbyteorder("<")

    @classmethod
    def for_array(cls, arr: zarr.Array) -> ChunkEncoder | None:
        """An encoder for ``arr`` when its chunks span every axis but the first and its codecs are ours."""
        codecs = list(arr.metadata.codecs)  # type: ignore[union-attr]
        if arr.metadata.zarr_format != 3 or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
            return None
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        if codecs[0].endian is not None and codecs[0].endian.value != "little":  # None: one-byte values
            return None
        if not isinstance(codecs[-1], Crc32cCodec):
            return None
        middle = codecs[1:-1]
        if not middle:
            return cls(arr, None)
        if len(middle) != 1 or not isinstance(middle[0], BloscCodec):
            return None
        codec = middle[0]
        blosc = numcodecs.Blosc(
            cname=codec.cname.value,
            clevel=codec.clevel,
            shuffle=_SHUFFLE[codec.shuffle.value],
            blocksize=codec.blocksize,
            typesize=codec.typesize,
        )
        return cls(arr, blosc)

    def encode(self, block: np.ndarray) -> bytes:
        """The stored bytes of one chunk (``block`` has the chunk's shape)."""
        raw = np.ascontiguousarray(block, dtype=self._dtype)
        data = raw.tobytes() if self._blosc is None else bytes(self._blosc.encode(raw))
        return data + np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()

    def encode_chunks(self, start: int, values: np.ndarray) -> list[Encoded]:
        """Store keys and bytes of ``values`` (whole chunks, ``start`` on a chunk boundary) from ``start``."""
        chunk, rest = self._arr.chunks[0], (0,) * (self._arr.ndim - 1)
        return [
            (
                self._arr.metadata.encode_chunk_key((start // chunk + i, *rest)),  # type: ignore[union-attr]
                self.encode(values[i * chunk : (i + 1) * chunk]),
            )
            for i in range(len(values) // chunk)
        ]

    def fits(self, start: int, values: np.ndarray) -> bool:
        """Whether ``values`` written at ``start`` are whole chunks."""
        chunk = self._arr.chunks[0]
        return start % chunk == 0 and len(values) % chunk == 0 and len(values) > 0


async def store_chunks(arr: zarr.Array, encoded: list[Encoded]) -> None:
    """Write chunks from :meth:`ChunkEncoder.encode_chunks` into ``arr``'s store."""
    buffer = default_buffer_prototype().buffer
    await asyncio.gather(*((arr.store_path / key).set(buffer.from_bytes(data)) for key, data in encoded))


class AppendedRows:
    """An array that only grows at its end, written a whole chunk at a time from rows kept in memory.

    Keeps the rows from the start of the chunk being filled, so that a commit writes each chunk it
    touches whole instead of zarr reading back, decoding and re-encoding a partly written chunk.
    Writes start at or after the previous write's start (a commit may rewrite its own rows).
    """

    def __init__(self, arr: zarr.Array, encoder: ChunkEncoder, rows: int) -> None:
        self._arr, self._encoder = arr, encoder
        self._chunk = int(arr.chunks[0])
        self._base = rows // self._chunk * self._chunk
        stored = min(rows, arr.shape[0])  # an array created after its first rows (labels) holds fewer
        kept = np.asarray(arr[self._base : stored]) if stored > self._base else np.empty((0, *arr.shape[1:]))
        self._rows = np.full((rows - self._base, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
        self._rows[: len(kept)] = kept

    def encode(self, start: int, values: np.ndarray) -> list[Encoded]:
        """Rows ``start .. start + len(values)`` replaced by ``values``: the encoded chunks they touch."""
        if start < self._base:
            raise ValueError(f"A write at row {start} of {self._arr.path}, before row {self._base} (kept in memory).")
        base = start // self._chunk * self._chunk
        kept = self._rows[base - self._base : start - self._base]
        gap = np.full((start - base - len(kept), *self._rows.shape[1:]), self._arr.fill_value, dtype=self._rows.dtype)
        self._rows = np.concatenate([kept, gap, np.asarray(values, dtype=self._rows.dtype)])
        self._base = base
        whole = -(-len(self._rows) // self._chunk) * self._chunk
        block = np.full((whole, *self._rows.shape[1:]), self._arr.fill_value, dtype=self._rows.dtype)
        block[: len(self._rows)] = self._rows
        return self._encoder.encode_chunks(base, block)


async def write_rows(writes: list[tuple[zarr.Array, int, np.ndarray]], encoded: dict[int, list[Encoded]]) -> None:
    """Write row blocks into several arrays concurrently, growing each ahead of need.

    Arrays grow geometrically in whole chunks, so most commits write data only;
    rows past ``steps_committed`` are never read (readers trust the attribute).
    The arrays in ``encoded`` (by ``id``) get those already encoded chunks instead.
    """
    grow = []
    for arr, start, values in writes:
        stop = start + len(values)
        if arr.shape[0] < stop:
            chunk = arr.chunks[0]
            length = -(-max(stop, 2 * arr.shape[0]) // chunk) * chunk
            grow.append(arr.async_array.resize((length, *arr.shape[1:])))
    await asyncio.gather(*grow)
    await asyncio.gather(
        *(arr.async_array.setitem(slice(s, s + len(v)), v) for arr, s, v in writes if id(arr) not in encoded),
        *(store_chunks(arr, encoded[id(arr)]) for arr, _, _ in writes if id(arr) in encoded),
    )


async def trim(lengths: list[tuple[zarr.Array, int]]) -> None:
    """Cut each array back to its length (they grow ahead in whole chunks), concurrently."""
    await asyncio.gather(*(arr.async_array.resize((n, *arr.shape[1:])) for arr, n in lengths if arr.shape[0] != n))
