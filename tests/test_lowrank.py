"""storage="lowrank": the products' math, the residual kept by checkpoints, and bad settings.

Reconstruction and completeness across a crash and resume, on every store, are in
test_trace_contract.py; kill + resume in test_crash.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PlainNet, image_loader, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain import functional as Fx
from lightning_tracetrain.exceptions import TraceMismatchError
from lightning_tracetrain.explain import Explainer
from lightning_tracetrain.explain.document import Query, influence_document
from lightning_tracetrain.explain.loading import Trust
from lightning_tracetrain.recording.lowrank import choose_lowrank


def test_one_power_iteration_keeps_a_matrix_of_at_most_the_rank_exactly():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    p, q = Fx.power_step(m, torch.randn(30, 3, generator=g, dtype=torch.float64))
    torch.testing.assert_close(p.T @ p, torch.eye(3, dtype=torch.float64))  # orthonormal columns
    torch.testing.assert_close(p @ q.T, m)
    p, q = Fx.power_step(m, torch.randn(30, 2, generator=g, dtype=torch.float64))  # rank 2 < 3: a projection
    torch.testing.assert_close(p.T @ (m - p @ q.T), torch.zeros(2, 30, dtype=torch.float64))


@pytest.mark.parametrize("queries", [1, 7])  # fewer queries than the rank: G Q first; more: the rebuilt steps
def test_gamma_of_the_factors_is_gamma_of_the_rebuilt_step(queries):
    g = torch.Generator().manual_seed(1)
    shape, rank, steps = (6, 3, 3, 3), 4, 5
    p = torch.randn(steps, 6, rank, generator=g, dtype=torch.float64)
    q = torch.randn(steps, 27, rank, generator=g, dtype=torch.float64)
    grads = torch.randn(queries, *shape, generator=g, dtype=torch.float64)
    dense = Fx.lowrank_deltas(p, q, shape)
    assert dense.shape == (steps, *shape)
    torch.testing.assert_close(Fx.lowrank_gammas(p, q, grads), Fx.step_gammas({"w": dense}, {"w": grads}).T)
    torch.testing.assert_close(Fx.lowrank_sum(p, q, shape), dense.sum(0))


def test_gamma_of_a_linear_layer_from_the_query_rows_is_gamma_of_the_rebuilt_step():
    g = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(12, 5).double()
    xs = [torch.randn(n, 12, generator=g, dtype=torch.float64) for n in (1, 3)]  # an image row, three graph nodes
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = torch.stack([Fx.query_gradient(layer, x, params)[1]["weight"] for x in xs])
    zs = [Fx.layer_output(layer, x, params).detach() for x in xs]
    p = torch.randn(4, 5, 2, generator=g, dtype=torch.float64)
    q = torch.randn(4, 12, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(Fx.lowrank_row_gammas(p, q, xs, zs), Fx.lowrank_gammas(p, q, grads))
    assert Fx.row_form_pays(torch.zeros(1, 512, 8), torch.zeros(1, 2048, 8), query_rows=40, queries=40)
    assert not Fx.row_form_pays(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), query_rows=4000, queries=40)


def test_only_layers_whose_factors_are_smaller_are_low_rank():
    shapes = {"conv": (4, 1, 3, 3), "fc": (16, 144), "head": (3, 16), "wide": (512, 1024)}
    assert choose_lowrank(shapes, 4) == ("fc", "wide")  # conv: 4 x (4 + 9) > 36, head: 4 x 19 > 48
    assert choose_lowrank(shapes, 1) == ("conv", "fc", "head", "wide")
    assert Fx.matrix_shape((8, 4, 3, 3)) == (8, 36)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """12 steps of PlainNet traced at rank 2, with a checkpoint after 5 steps."""
    folder = tmp_path_factory.mktemp("lowrank")
    torch.manual_seed(0)
    model = PlainNet()
    ckpt = ModelCheckpoint(folder / "ckpt", filename="{step}", every_n_train_steps=5, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=12,
        enable_checkpointing=True,
        callbacks=[TraceCallback(folder / "t", storage="lowrank", rank=2), ckpt],
    )
    trainer.fit(model, image_loader(n=48))
    return folder, model.eval()


QUERIES = [{"x": torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(q))} for q in range(3)]


def test_a_checkpoint_without_its_residual_is_explained_exactly(run):
    """After 5 of 12 steps the trace holds the residual of the end only: the model's own weights give the
    unattributed share, so the shares still add up; the exactly stored biases are still checked."""
    folder, _ = run
    trace = Trace(folder / "t")
    assert trace.residual("fc")[0] == trace.num_steps == 12
    explainer = Explainer.from_checkpoint(folder / "ckpt" / "step=5.ckpt", trace, trust=Trust(modules=("conftest",)))
    assert explainer.stop == 5
    for name, a in explainer.explain(QUERIES).items():
        assert a.gamma.shape == (3, 5) and a.unattributed is not None
        assert float(a.residual.abs().max()) <= 1e-5, name


def test_the_stored_residual_tells_a_changed_weight_apart(run):
    folder, model = run
    trace = Trace(folder / "t")
    results = Explainer(model, trace).explain(QUERIES)
    assert all(float(a.residual.abs().max()) <= 1e-5 for a in results.values())
    z = {n: float(a.z_sq.mean()) for n, a in results.items()}
    assert all(float(a.unattributed.abs().max()) < z[n] for n, a in results.items())  # a share, not all of it
    logits = torch.cat([model(q["x"]) for q in QUERIES]).detach()
    doc = influence_document(trace, 12, results, logits, [Query(i, -1) for i in range(3)], checkpoint="ckpt")
    for name, layer in doc["queries"][0]["layers"].items():  # the shares in the document add up too
        total = layer["init_score"] + sum(layer["class_scores"].values()) + layer["unattributed_score"]
        assert total == pytest.approx(layer["norm_sq"], rel=1e-4), name
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-2  # only the low-rank weight: its bias still matches
    try:
        with pytest.raises(TraceMismatchError, match=r"fc\.weight"):
            Explainer(model, trace).explain(QUERIES)
    finally:
        with torch.no_grad():
            model.fc.weight[0, 0] -= 1e-2


def test_feedback_keeps_the_decomposition_exact(tmp_path):
    torch.manual_seed(0)
    model = PlainNet()
    callback = TraceCallback(tmp_path / "t", storage="lowrank", rank=1, feedback=True)
    quiet_trainer(max_steps=8, callbacks=[callback]).fit(model, image_loader(n=48))
    trace = Trace(tmp_path / "t")
    assert trace.spec.feedback and "with error feedback" in trace.summary()
    for name in trace.layers:
        torch.testing.assert_close(trace.final(name)["weight"], getattr(model, name).weight.detach(), atol=1e-6, rtol=0)
    assert all(float(a.residual.abs().max()) <= 1e-5 for a in Explainer(model.eval(), trace).explain(QUERIES).values())


def test_bad_settings_are_named(run, tmp_path):
    with pytest.raises(ValueError, match="rank must be at least 1"):
        TraceCallback(tmp_path, storage="lowrank", rank=0)
    folder, _ = run
    model = PlainNet()
    trainer = quiet_trainer(max_steps=8, callbacks=[TraceCallback(folder / "t", storage="lowrank", rank=3)])
    with pytest.raises(TraceMismatchError, match="rank-2 steps"):
        trainer.fit(model, image_loader(n=48), ckpt_path=folder / "ckpt" / "step=5.ckpt")
