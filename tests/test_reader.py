"""The trace reader: chunked reads, bounds, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
import zarr
from conftest import TinyCNN, image_loader, quiet_trainer

from lightning_tracetrain import Trace, TraceCallback, TraceFormatError, UnknownLayerError
from lightning_tracetrain.functional import accumulate, weight_deltas
from lightning_tracetrain.trace import FORMAT_VERSION


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Trace:
    path = tmp_path_factory.mktemp("reader") / "t"
    quiet_trainer(max_steps=11, callbacks=[TraceCallback(path, chunk_steps=4, compressor="lz4")]).fit(
        TinyCNN(), image_loader()
    )
    return Trace(path)


def test_reads_across_chunks_agree_with_one_read(trace):
    full = trace.deltas("fc")["weight"]
    assert full.shape == (11, 8, 36)
    torch.testing.assert_close(trace.deltas("fc", 3, 9)["weight"], full[3:9], rtol=0, atol=0)
    chunks = [c["weight"] for c in trace.iter_deltas("fc", 1, 11)]
    assert [len(c) for c in chunks] == [3, 4, 3]  # aligned to the stored chunks of 4 steps
    torch.testing.assert_close(torch.cat(chunks), full[1:], rtol=0, atol=0)


def test_bounds_and_unknown_layers(trace):
    with pytest.raises(IndexError, match="11 committed steps"):
        trace.deltas("fc", 0, 12)
    with pytest.raises(IndexError, match=r"0\.\.11"):
        trace.weights_at(12)
    with pytest.raises(UnknownLayerError, match="Traced layers: conv, fc, head"):
        trace.initial("features")


def test_readers_see_committed_steps_only(tmp_path, trace):
    """Rows past steps_committed (a write that was cut off) stay invisible."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trace.path, copy)
    zarr.open_group(str(copy), mode="r+").update_attributes({"steps_committed": 7, "examples_committed": 7 * 8})
    cut = Trace(copy)
    assert cut.num_steps == 7 and len(cut.steps.global_step) == 7
    assert cut.deltas("conv")["weight"].shape[0] == 7
    assert len(cut.examples.index) == cut.steps.example_stop[-1] == 7 * 8


def test_not_a_trace(tmp_path):
    with pytest.raises(TraceFormatError, match="does not exist"):
        Trace(tmp_path / "missing")
    zarr.open_group(str(tmp_path / "other"), mode="w")
    with pytest.raises(TraceFormatError, match="not a lightning_tracetrain trace"):
        Trace(tmp_path / "other")


def test_newer_format_version_is_refused(tmp_path, trace):
    import shutil

    newer = FORMAT_VERSION + 1
    shutil.copytree(trace.path, tmp_path / "newer")
    zarr.open_group(str(tmp_path / "newer"), mode="r+").update_attributes({"format_version": newer})
    with pytest.raises(TraceFormatError, match=f"version {newer}; this lightning_tracetrain reads versions 1, 2"):
        Trace(tmp_path / "newer")


def test_any_zarr_client_reads_the_documented_layout(trace):
    group = zarr.open_group(trace.path, mode="r")
    n = group.attrs["steps_committed"]
    w0 = torch.from_numpy(group["layers/head/initial/weight"][:])
    d = torch.from_numpy(group["layers/head/delta/weight"][:n])
    torch.testing.assert_close(w0 + d.sum(0), trace.final("head")["weight"])
    assert group["steps/lr"].shape == (n, 1)


def test_functional_deltas_and_accumulate_are_exact_for_half_precision():
    before = torch.randn(5, dtype=torch.bfloat16)
    after = before + torch.randn(5, dtype=torch.bfloat16)
    (delta,) = weight_deltas([after], [before.float()])
    assert delta.dtype == torch.float32
    assert torch.equal((before.float() + delta).bfloat16(), after)
    chunks = [torch.full((3, 2), 0.1), torch.full((2, 2), 0.1)]
    torch.testing.assert_close(accumulate(torch.zeros(2), chunks), torch.full((2,), 0.5))
