"""``storage="factored"``: Linear layers under plain SGD stored as exact per-example factors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import PlainNet, TinyGNN, assert_reconstructs, image_loader, quiet_trainer, tiny_graphs
from torch import nn

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain import functional as Fx
from lightning_tracetrain.explain import Explainer, example_attribution


@pytest.fixture(scope="module")
def traces(tmp_path_factory: Any) -> tuple[PlainNet, Trace, Trace]:
    """One run on shuffled (mixed-class) batches of 8, traced lossless and factored at once."""
    folder = tmp_path_factory.mktemp("factored")
    torch.manual_seed(0)
    model = PlainNet()
    callbacks = [TraceCallback(folder / "lossless"), TraceCallback(folder / "factored", storage="factored")]
    quiet_trainer(max_epochs=3, callbacks=callbacks).fit(model, image_loader(n=44, batch_size=8))
    return model.eval(), Trace(folder / "lossless"), Trace(folder / "factored")


def test_linear_layers_are_factored_where_their_factors_are_smaller(traces):
    _, lossless, factored = traces
    # fc: 8 rows x (36 + 32) < 36 x 32; head: 8 x (32 + 3) > 32 x 3; conv is not a Linear
    assert factored.storage == "factored" and factored.spec.factored == ("fc",)
    assert "factored: fc as per-example factors" in factored.summary()
    rows = factored.factors("fc")
    assert rows.inputs.shape == (len(factored.examples.index), 36) and rows.outputs.shape[1] == 32
    assert rows.counts.tolist() == ([8] * (44 // 8) + [44 % 8]) * 3  # each epoch's last batch holds the rest
    assert factored.nbytes()["raw"] == lossless.nbytes()["raw"]
    assert factored.nbytes()["stored"] < lossless.nbytes()["stored"]
    with pytest.raises(KeyError, match="stored as dense deltas"):
        factored.factors("head")


def test_factors_rebuild_every_step_and_the_final_weights(traces):
    model, lossless, factored = traces
    assert factored.num_steps == lossless.num_steps == 18
    assert_reconstructs(factored, model, atol=1e-6)
    for layer in lossless.layers:
        for param, value in lossless.deltas(layer).items():
            rebuilt = factored.deltas(layer)[param]
            # the actual change of a float32 weight rounds to the weight's precision (about 1e-8 here)
            torch.testing.assert_close(rebuilt, value, rtol=1e-4, atol=1e-7, msg=f"{layer}.{param}")
    # the stored factors are the input rows and -lr times the output gradient of every example
    rows = factored.factors("fc", 0, 1)
    assert torch.equal(factored.deltas("fc", 0, 1)["weight"][0], rows.outputs.T @ rows.inputs)


def test_each_example_share_adds_up_to_its_step_gamma(traces):
    model, lossless, factored = traces
    queries = [{"x": torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(q))} for q in range(3)]
    exact = Explainer(model, factored).explain(queries)
    dense = Explainer(model, lossless).explain(queries)
    fc = exact["fc"]
    assert fc.rows is not None and exact["head"].rows is None and exact["conv"].rows is None
    steps = factored.steps
    per_step = Fx.step_sums(fc.rows, steps.example_stop - steps.example_start)
    torch.testing.assert_close(per_step, fc.gamma, rtol=1e-4, atol=1e-5 * float(fc.z_sq.max()))
    torch.testing.assert_close(fc.gamma, dense["fc"].gamma, rtol=1e-4, atol=1e-5 * float(fc.z_sq.max()))
    assert float(fc.residual.abs().max()) < 1e-4
    # Algorithm 1 with exact shares: the examples' scores plus the initialization's share give ||Z||^2
    scores, labels = example_attribution(steps, factored.examples, fc.gamma, factored.num_steps, rows=fc.rows)
    torch.testing.assert_close(scores.sum(1) + fc.init.double(), fc.z_sq.double(), rtol=1e-4, atol=1e-4)
    # every example of a mixed batch gets its own share, not the step's average
    first = fc.rows[0, : int(steps.example_stop[0])]
    assert float(first.std()) > 1e-3 * float(first.abs().mean())
    assert set(labels[labels >= 0].tolist()) == {0, 1, 2}


def test_graph_layers_whose_rows_are_nodes_stay_dense(tmp_path):
    from torch_geometric.loader import DataLoader as GraphLoader

    from lightning_tracetrain import IndexedDataset

    torch.manual_seed(0)
    model = TinyGNN(momentum=0.0)
    loader = GraphLoader(IndexedDataset(tiny_graphs(12)), batch_size=4)
    quiet_trainer(max_epochs=1, callbacks=[TraceCallback(tmp_path / "t", storage="factored")]).fit(model, loader)
    trace = Trace(tmp_path / "t")
    assert trace.spec.factored == ()  # GIN's Linear layers see node rows; the head is larger as factors
    assert_reconstructs(trace, model)


def test_gradient_accumulation_concatenates_the_batches_factors(tmp_path):
    torch.manual_seed(0)
    model = PlainNet()
    trainer = quiet_trainer(
        max_epochs=1, accumulate_grad_batches=2, callbacks=[TraceCallback(tmp_path / "t", storage="factored")]
    )
    trainer.fit(model, image_loader(n=32, batch_size=4))
    trace = Trace(tmp_path / "t")
    assert trace.spec.factored == ("fc",) and trace.factors("fc").counts.tolist() == [8, 8, 8, 8]
    assert_reconstructs(trace, model, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "trainer_args", "message"),
    [
        (PlainNet(momentum=0.9), {}, r"needs plain SGD, but fc.weight is updated by SGD\(momentum=0.9\)"),
        (PlainNet(), {"gradient_clip_val": 1.0}, "needs unclipped gradients"),
        (PlainNet(penalty=0.01), {}, "factors of fc.weight do not rebuild its change in the first step"),
        (PlainNet(bias_lr=0.01), {}, "factors of fc.bias do not rebuild its change"),
    ],
)
def test_runs_whose_steps_do_not_factor_are_refused(tmp_path, model, trainer_args, message):
    trainer = quiet_trainer(max_epochs=1, callbacks=[TraceCallback(tmp_path / "t", storage="factored")], **trainer_args)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, image_loader(n=16, batch_size=8))


def test_factored_deltas_and_row_gammas_match_loops():
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1]
    a, out = torch.randn(9, 7, generator=g), torch.randn(9, 4, generator=g)
    deltas = Fx.factored_deltas(a, out, counts)
    bounds = np.cumsum([0, *counts])
    for t in range(len(counts)):
        expected = sum((torch.outer(out[r], a[r]) for r in range(bounds[t], bounds[t + 1])), torch.zeros(4, 7))
        torch.testing.assert_close(deltas[t], expected)
    # a Linear layer's query gradient is G_W = Z^T H, G_b = sum of Z over the query's rows
    layer = nn.Linear(7, 4)
    xs = [torch.randn(1, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(2, 2, 7, generator=g)]
    zs = [layer(x).detach() for x in xs]
    params = {p: getattr(layer, p).detach() for p in ("weight", "bias")}
    grads = [Fx.query_gradient(layer, x, params)[1] for x in xs]
    gw, gb = torch.stack([gr["weight"] for gr in grads]), torch.stack([gr["bias"] for gr in grads])
    inputs, outputs = torch.randn(9, 7, generator=g), torch.randn(9, 4, generator=g)
    expected = torch.einsum("ro,qoi,ri->qr", outputs, gw, inputs) + gb @ outputs.T
    for budget in (2**25, 5):  # one product, or a few rows at a time
        torch.testing.assert_close(Fx.row_gammas(inputs, outputs, xs, zs, budget=budget), expected)
    no_bias = torch.einsum("ro,qoi,ri->qr", outputs, gw, inputs)
    torch.testing.assert_close(Fx.row_gammas(inputs, outputs, xs, zs, bias=False), no_bias)
