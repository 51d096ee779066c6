"""The explainer: exact decomposition, agreement with a direct per-step loop, and clear errors."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import TinyCNN, TinyGNN, image_loader, quiet_trainer, tiny_graphs
from torch import Tensor, nn
from torch_geometric.data import Batch
from torch_geometric.nn import GCNConv

from lightning_tracetrain import (
    IndexedDataset,
    Trace,
    TraceCallback,
    TraceFormatError,
    TraceMismatchError,
    UnknownLayerError,
)
from lightning_tracetrain import functional as Fx
from lightning_tracetrain.explain import Explainer, class_attribution, example_attribution
from lightning_tracetrain.explain.chunks import ChunkLoader, TraceChunks, split_ranges


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(6, 4), nn.Conv2d(3, 5, 3, stride=2, padding=1), GCNConv(6, 4).lin, nn.Conv1d(2, 3, 4, dilation=2)],
    ids=["linear", "conv2d-stride-padding", "pyg-linear", "conv1d-dilation"],
)
def test_completeness_of_the_decomposition(layer):
    """gamma_0 + sum_t gamma_t == ||Z||^2 with initialization and biases included."""
    torch.manual_seed(0)
    shapes = {"weight": layer.weight.shape, **({"bias": layer.bias.shape} if layer.bias is not None else {})}
    initial = {p: torch.randn(s) for p, s in shapes.items()}
    deltas = {p: 0.1 * torch.randn(7, *s) for p, s in shapes.items()}
    final = {p: initial[p] + deltas[p].sum(0) for p in shapes}
    x = {nn.Linear: torch.randn(5, 6), nn.Conv2d: torch.randn(1, 3, 9, 9), nn.Conv1d: torch.randn(1, 2, 20)}.get(
        type(layer), torch.randn(5, 6)
    )
    z, grads = Fx.query_gradient(layer, x, final)
    gamma = Fx.step_gammas(deltas, {p: g[None] for p, g in grads.items()})[:, 0]
    gamma0 = (z * Fx.layer_output(layer, x, initial)).sum()
    residual = (gamma0 + gamma.sum() - z.pow(2).sum()) / z.pow(2).sum()
    assert abs(float(residual)) <= 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[TinyCNN, Trace, list[dict[str, Tensor]]]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("explain") / "t"
    model = TinyCNN()
    quiet_trainer(max_epochs=2, callbacks=[TraceCallback(path, chunk_steps=4)]).fit(model, image_loader(n=40))
    queries = [{"x": torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(s))} for s in range(3)]
    return model, Trace(path), queries


def test_explainer_is_exact_and_agrees_with_a_direct_per_step_loop(tiny):
    model, trace, queries = tiny
    results = Explainer(model, trace).explain(queries)
    assert set(results) == {"conv", "fc", "head"}
    for name, a in results.items():
        assert a.gamma.shape == (3, trace.num_steps)
        assert a.residual.abs().max() <= 1e-5, name
        layer = dict(model.named_modules())[name]
        deltas = trace.deltas(name)
        for q, query in enumerate(queries):
            seen = {}
            hook = layer.register_forward_hook(lambda m, args, out, seen=seen: seen.update(x=args[0], z=out))
            with torch.no_grad():
                model(query["x"])
            hook.remove()
            for t in range(0, trace.num_steps, 3):  # the slow reference: the layer's forward with D_t as weight
                contrib = Fx.layer_output(layer, seen["x"], {p: d[t] for p, d in deltas.items()})
                gamma = (seen["z"] * contrib).sum()
                torch.testing.assert_close(a.gamma[q, t], gamma, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(a.norm[q, t], contrib.norm(), atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(
                    a.cos[q, t], gamma / (seen["z"].norm() * contrib.norm()), atol=1e-5, rtol=1e-4
                )


def test_a_batch_of_queries_equals_one_at_a_time(tiny):
    model, trace, queries = tiny
    together = Explainer(model, trace).explain(queries)
    for q, query in enumerate(queries):
        alone = Explainer(model, trace).explain([query])
        for name in together:
            for field in ("gamma", "cos", "norm", "init", "z_sq"):
                torch.testing.assert_close(getattr(alone[name], field)[0], getattr(together[name], field)[q])


def test_algorithm_1_splits_each_steps_gamma_over_its_real_examples(tiny):
    model, trace, queries = tiny
    gamma = Explainer(model, trace, layers=["head"]).explain(queries[:1])["head"].gamma
    scores, labels = example_attribution(trace.steps, trace.examples, gamma, trace.num_steps)
    expected = torch.zeros(40, dtype=torch.float64)
    for t in range(trace.num_steps):
        ids = trace.real_examples(t)
        expected[ids] += float(gamma[0, t]) / len(ids)
    torch.testing.assert_close(scores[0], expected)
    torch.testing.assert_close(sum(class_attribution(scores, labels).values())[0], gamma[0].double().sum())


@pytest.mark.parametrize("budget", [2**25, 50], ids=["one-product", "tiny-budget"])
@pytest.mark.parametrize(
    "layer, xs",
    [
        (nn.Conv2d(3, 5, 3, padding=1), [torch.randn(1, 3, 6, 6) for _ in range(5)]),
        (nn.Linear(6, 4), [torch.randn(n, 6) for n in (3, 1, 7, 2)]),  # graphs: a row per node
        (nn.Linear(6, 4), [torch.randn(6), torch.randn(2, 6), torch.randn(2, 3, 6)]),  # vector, rows, tokens
        (nn.Linear(3, 8), [torch.randn(n, 3) for n in (50, 40, 60)]),  # many rows, few features: Gram path
        (nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2, bias=False), [torch.randn(1, 2, 9, 9) for _ in range(4)]),
        (nn.Conv2d(4, 4, 3, groups=2), [torch.randn(1, 4, 7, 7) for _ in range(3)]),
    ],
    ids=["conv", "linear-rows", "linear-mixed-shapes", "linear-many-rows", "conv-strided-no-bias", "conv-groups"],
)
def test_contribution_norms_of_many_queries_equal_one_query_at_a_time(layer, xs, budget):
    """Batched over queries (grouped by shape, chunked by the budget, or by the Gram identity for
    Linear/Conv2d with few input features) == ||H_q D_t^T + d_t|| query by query."""
    torch.manual_seed(1)
    deltas = {p: torch.randn(6, *getattr(layer, p).shape) for p in ("weight", "bias") if getattr(layer, p) is not None}
    norms = Fx.contribution_norms(layer, xs, deltas, budget=budget)
    assert norms.shape == (len(xs), 6)
    for q, x in enumerate(xs):
        for t in range(6):
            z = Fx.layer_output(layer, x, {p: d[t] for p, d in deltas.items()})
            torch.testing.assert_close(norms[q, t], z.norm(), atol=1e-5, rtol=1e-5)


def test_the_gram_identity_is_used_only_where_it_pays():
    """Early convolutions (few input features, many positions) take the Gram path; a one-row Linear does not."""
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(3, 5, 3, padding=1), nn.Linear(64, 10)
    deltas = {"weight": torch.randn(6, 5, 3, 3, 3), "bias": torch.randn(6, 5)}
    assert Fx.gram_norms(conv, [torch.randn(1, 3, 6, 6)] * 5, deltas, 2**25) is not None
    assert Fx.gram_norms(conv, [torch.randn(1, 3, 6, 6)] * 5, deltas, 50) is None  # over the memory budget
    fc_deltas = {"weight": torch.randn(6, 10, 64), "bias": torch.randn(6, 10)}
    assert Fx.gram_norms(fc, [torch.randn(1, 64)] * 5, fc_deltas, 2**25) is None


def test_graph_layers_are_explained_exactly(tmp_path):
    from torch_geometric.loader import DataLoader as GraphLoader

    graphs, model = tiny_graphs(), TinyGNN(momentum=0.9)
    quiet_trainer(max_epochs=2, callbacks=[TraceCallback(tmp_path / "t")]).fit(
        model, GraphLoader(IndexedDataset(graphs), batch_size=4)
    )
    results = Explainer(model, tmp_path / "t").explain(
        [Batch.from_data_list([graphs[0]]), Batch.from_data_list([graphs[5]])]
    )
    assert set(results) == {"gin.nn.0", "gin.nn.2", "gcn.lin", "out"}
    for a in results.values():
        assert a.residual.abs().max() <= 1e-5


def test_bad_input_is_named(tiny, tmp_path):
    model, trace, queries = tiny
    with pytest.raises(UnknownLayerError, match=r"'nope' was not traced.*Traced layers: conv, fc, head"):
        Explainer(model, trace, layers=["nope"])
    other = TinyCNN()  # same architecture, other weights: a checkpoint of another run, found by the pass itself
    with pytest.raises(TraceMismatchError, match=r"Layer conv.weight .*different models or runs"):
        Explainer(other, trace).explain(queries[:1])
    smaller = nn.Sequential()
    smaller.add_module("conv", nn.Conv2d(1, 2, 3))
    with pytest.raises(TraceMismatchError, match=r"conv.weight of the model has shape \(2, 1, 3, 3\).*\(4, 1, 3, 3\)"):
        Explainer(smaller, trace, layers=["conv"])  # shapes are checked before any pass
    quiet_trainer(max_steps=0, callbacks=[TraceCallback(tmp_path / "none")]).fit(TinyCNN(), image_loader())
    assert not (tmp_path / "none").exists()  # the trace is created at the first step: nothing is left behind
    shutil.copytree(trace.path, tmp_path / "empty")
    zarr.open_group(str(tmp_path / "empty"), mode="r+").attrs.update({"steps_committed": 0, "examples_committed": 0})
    with pytest.raises(TraceFormatError, match="no committed step"):
        Explainer(TinyCNN(), tmp_path / "empty")


def test_weighted_kde_integrates_to_one_and_follows_weights():
    grid = torch.linspace(-1, 1, 401, dtype=torch.float64)
    density = Fx.weighted_kde(torch.tensor([-0.5, 0.5]).double(), torch.tensor([1.0, 3.0]).double(), grid, 0.1)
    assert abs(float(torch.trapezoid(density, grid)) - 1.0) < 1e-3
    at = {v: int((grid - v).abs().argmin()) for v in (-0.5, 0.5)}
    assert float(density[at[0.5]]) == pytest.approx(3 * float(density[at[-0.5]]), rel=1e-6)
    assert Fx.weighted_kde(torch.tensor([]), torch.tensor([]), grid).abs().sum() == 0
    assert np.isfinite(density.numpy()).all()


def test_split_ranges_give_every_device_work_and_cover_each_step_once():
    for stop, chunk, devices in [(40, 57, 1), (40, 57, 2), (40, 57, 3), (120, 57, 2), (120, 57, 8), (5, 57, 5)]:
        stored = [(a, min(a + chunk, stop)) for a in range(0, stop, chunk)]
        ranges = split_ranges(stored, devices)
        assert len(ranges) == max(devices, len(stored))
        assert [s for a, b in ranges for s in range(a, b)] == list(range(stop))
        assert all(b > a and a // chunk == (b - 1) // chunk for a, b in ranges)  # never across a stored chunk
    with pytest.raises(ValueError, match="fewer than the 4 devices"):
        split_ranges([(0, 3)], 4)


def test_chunks_are_the_readers_chunks_and_read_ahead_returns_the_asked_chunk_in_any_order(tiny):
    """Items follow the stored chunks; reading ahead (in order, with a DDP-like stride, or in an
    unforeseen order) never returns another chunk's data."""
    _, trace, _ = tiny
    chunks = TraceChunks(trace, trace.layers, trace.num_steps)
    assert chunks.ranges == trace.chunk_ranges() and len(chunks) >= 3
    for order in ([*range(len(chunks))], [*range(0, len(chunks), 2)], [2, 0, 1, 1, len(chunks) - 1, 0]):
        loader = ChunkLoader(chunks, batch_size=None, sampler=order)
        items = list(loader)
        assert [(item["start"], item["stop"]) for item in items] == [chunks.ranges[i] for i in order]
        for item in items:
            for lay in trace.layers:
                deltas, factors = item["layers"][lay]
                assert factors is None
                for p, d in trace.deltas(lay, item["start"], item["stop"]).items():
                    assert torch.equal(deltas[p], d)
    assert pickle.loads(pickle.dumps(chunks)).trace.num_steps == trace.num_steps  # what worker processes get


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_pass_equals_the_cpu_pass(tiny):
    import copy

    model, trace, queries = tiny
    cpu = Explainer(copy.deepcopy(model), trace)
    cpu.set_queries(queries)
    on_cpu = cpu.run(accelerator="cpu")
    gpu = Explainer(copy.deepcopy(model), trace)
    gpu.set_queries(queries)
    on_gpu = gpu.run(accelerator="gpu")
    for name, a in on_cpu.items():
        b = on_gpu[name]
        for field in ("gamma", "cos", "norm", "init", "z_sq"):
            torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-5, rtol=1e-4)
        assert float(b.residual.abs().max()) <= 1e-5
