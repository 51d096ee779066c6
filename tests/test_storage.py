"""Storage modes: what ``compact`` stores and bad options (every mode's exactness is in test_trace_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyCNN, image_loader, quiet_trainer

from lightning_tracetrain import Trace, TraceCallback

KEEPBITS = 4


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """One run traced twice at once: lossless and compact hold the same steps."""
    folder = tmp_path_factory.mktemp("storage")
    torch.manual_seed(0)
    model = TinyCNN()
    callbacks = [
        TraceCallback(folder / "lossless"),
        TraceCallback(folder / "compact", storage="compact", keepbits=KEEPBITS),
    ]
    quiet_trainer(max_epochs=3, callbacks=callbacks).fit(model, image_loader(n=40))
    return model.eval(), Trace(folder / "lossless"), Trace(folder / "compact")


def test_compact_deltas_keep_only_keepbits_mantissa_bits(traces):
    _, lossless, compact = traces
    assert lossless.storage == "lossless" and compact.storage == "compact" and compact.spec.keepbits == KEEPBITS
    assert "compact: 4 mantissa bits" in compact.summary()
    for layer in compact.layers:
        for d in compact.deltas(layer).values():
            low_bits = d.numpy().view(np.int32) & ((1 << (23 - KEEPBITS)) - 1)
            assert not low_bits.any()
    assert compact.nbytes()["stored"] < 0.7 * lossless.nbytes()["stored"]


def test_bad_storage_options_name_the_choices():
    with pytest.raises(ValueError, match="'lossless', 'compact', 'factored'"):
        TraceCallback("unused", storage="bfloat16")
    with pytest.raises(ValueError, match="keepbits must be between 0 and 23"):
        TraceCallback("unused", storage="compact", keepbits=30)
