"""Whole chunks encoded outside zarr: the same bytes zarr writes, and rows appended across chunk boundaries."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from lightning_tracetrain.trace.background import yield_cpu
from lightning_tracetrain.trace.chunks import AppendedRows, ChunkEncoder, store_chunks
from lightning_tracetrain.trace.codecs import checksummed, make_compressor


def _array(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, compressors) -> zarr.Array:
    group = zarr.open_group(str(path), mode="w")
    return group.create_array("a/b", shape=shape, chunks=chunks, dtype=dtype, compressors=compressors, fill_value=-1)


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("c/*")) if p.is_file()}


@pytest.mark.parametrize("compressor", ["lz4", "zstd", "none"])
@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_encoded_chunks_are_the_bytes_zarr_writes(tmp_path, compressor, dtype):
    values = (np.random.default_rng(0).standard_normal((12, 3, 5)) * 4).astype(dtype)
    codecs = checksummed(make_compressor(compressor))
    by_zarr = _array(tmp_path / "zarr", (12, 3, 5), (4, 3, 5), dtype, codecs)
    by_zarr[:] = values
    direct = _array(tmp_path / "direct", (12, 3, 5), (4, 3, 5), dtype, codecs)
    encoder = ChunkEncoder.for_array(direct)
    assert encoder is not None and encoder.fits(0, values) and not encoder.fits(2, values[:4])
    sync(store_chunks(direct, encoder.encode_chunks(0, values)))
    assert _files(tmp_path / "direct") == _files(tmp_path / "zarr")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "direct" / "a" / "b"))[:], values)


def test_other_codecs_and_chunk_shapes_are_left_to_zarr(tmp_path):
    no_checksum = _array(tmp_path / "1", (8, 3), (4, 3), "float32", (BloscCodec(cname="lz4"),))
    other = _array(tmp_path / "2", (8, 3), (4, 3), "float32", (ZstdCodec(), Crc32cCodec()))
    split = _array(tmp_path / "3", (8, 4), (4, 2), "float32", checksummed(None))
    assert [ChunkEncoder.for_array(a) for a in (no_checksum, other, split)] == [None, None, None]


def test_appended_rows_write_whole_chunks_across_boundaries_and_rewrites(tmp_path):
    arr = _array(tmp_path / "t", (32,), (4,), "int64", checksummed(make_compressor("lz4")))
    rows = AppendedRows(arr, ChunkEncoder.for_array(arr), 0)
    expected = np.full(32, -1)
    for start, stop in [(0, 3), (0, 6), (6, 7), (7, 13), (13, 13), (13, 20)]:  # (0, 6) rewrites a commit's own rows
        values = np.arange(start, stop) * 10
        sync(store_chunks(arr, rows.encode(start, values)))
        expected[start:stop] = values
        np.testing.assert_array_equal(arr[:], expected)
    with pytest.raises(ValueError, match="before row 12"):
        rows.encode(5, np.zeros(1, np.int64))
    resumed = AppendedRows(arr, ChunkEncoder.for_array(arr), 18)  # reopened after a cut back to 18 rows
    sync(store_chunks(arr, resumed.encode(18, np.array([7, 8, 9]))))
    expected[18:21] = [7, 8, 9]
    np.testing.assert_array_equal(arr[:], expected)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priorities")
def test_the_commit_thread_yields_the_cpu_to_training():
    seen = []

    def run() -> None:
        yield_cpu()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == os.getpriority(os.PRIO_PROCESS, 0)


def test_appended_rows_of_an_array_created_late_read_as_missing(tmp_path):
    arr = _array(tmp_path / "t", (0,), (4,), "int64", checksummed(make_compressor("lz4")))  # labels seen late
    rows = AppendedRows(arr, ChunkEncoder.for_array(arr), 6)
    arr.resize((8,))
    sync(store_chunks(arr, rows.encode(6, np.array([3, 4]))))
    np.testing.assert_array_equal(arr[:], [-1, -1, -1, -1, -1, -1, 3, 4])
