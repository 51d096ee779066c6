"""Storage modes: ``compact`` rounds deltas with error feedback, so the weights stay close at every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyCNN, image_loader, quiet_trainer

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.explainer import Explainer

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


def test_error_feedback_keeps_the_weights_within_one_rounding_at_every_step(traces):
    _, lossless, compact = traces
    assert compact.num_steps == lossless.num_steps == 15
    for layer in lossless.layers:
        for param, deltas in lossless.deltas(layer).items():
            bound = 2.0**-KEEPBITS * deltas.abs().max(0).values + 1e-6  # one step's rounding, elementwise
            for k in range(lossless.num_steps + 1):
                drift = (compact.weights_at(k)[layer][param] - lossless.weights_at(k)[layer][param]).abs()
                assert bool((drift <= bound).all()), (layer, param, k, float((drift - bound).max()))
            # without error feedback the rounding errors of all steps would add up
            naive = sum(torch.from_numpy(_round(d.numpy())) - d for d in deltas)
            assert float(drift.max()) < float(naive.abs().max()) or float(naive.abs().max()) < 1e-6


def test_the_explainer_accepts_a_compact_trace_and_stays_nearly_complete(traces):
    model, lossless, compact = traces
    queries = [{"x": torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(q))} for q in range(3)]
    exact = Explainer(model, lossless).explain(queries)
    approx = Explainer(model, compact).explain(queries)  # the final weights check passes within the rounding
    for name, a in exact.items():
        b = approx[name]
        assert float(b.residual.abs().max()) <= 1e-3
        torch.testing.assert_close(b.gamma.sum(1), a.gamma.sum(1), rtol=1e-2, atol=1e-3 * float(a.z_sq.max()))


def test_bad_storage_options_name_the_choices():
    with pytest.raises(ValueError, match="'lossless', 'compact', 'factored'"):
        TraceCallback("unused", storage="bfloat16")
    with pytest.raises(ValueError, match="keepbits must be between 0 and 23"):
        TraceCallback("unused", storage="compact", keepbits=30)


def _round(a: np.ndarray) -> np.ndarray:
    import numcodecs

    return numcodecs.BitRound(KEEPBITS).encode(a).view(np.float32).reshape(a.shape)
