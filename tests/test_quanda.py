"""The quanda adapter: our scores in quanda's explainer interface, judged by quanda's own metrics."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCNN, image_loader, quiet_trainer

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.explain import Explainer, example_attribution

quanda = pytest.importorskip("quanda", reason="quanda is installed by `make test` (pip install --no-deps quanda)")
from quanda.metrics.downstream_eval import ClassDetectionMetric  # noqa: E402
from quanda.metrics.heuristics import TopKCardinalityMetric  # noqa: E402

from lightning_tracetrain.quanda import TraceExplainer  # noqa: E402


class _Pairs(torch.utils.data.Dataset):
    """The training set as quanda sees it: (input, label) pairs, indexed by the trace's example ids."""

    def __init__(self, loader) -> None:
        self.base = loader.dataset

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        return item["x"], item["y"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quanda")
    torch.manual_seed(0)
    model = TinyCNN()
    loader = image_loader(n=40)
    quiet_trainer(max_epochs=3, callbacks=[TraceCallback(folder / "t")]).fit(model, loader)
    return model.eval(), _Pairs(loader), Trace(folder / "t")


def test_the_adapter_gives_algorithm_1_scores_for_every_training_example(run):
    model, train, trace = run
    test_x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    explainer = TraceExplainer(model, train, trace, layer="fc")
    scores = explainer.explain(test_x, targets=torch.zeros(4, dtype=torch.long))
    assert scores.shape == (4, len(train))
    gamma = Explainer(model, trace, layers=["fc"]).explain([{"x": x[None]} for x in test_x])["fc"].gamma
    expected, _ = example_attribution(trace.steps, trace.examples, gamma, trace.num_steps)
    torch.testing.assert_close(scores, expected.float())
    late = TraceExplainer(model, train, trace, layer="fc", warmup_steps=5).explain(test_x)
    gamma[:, :5] = 0.0  # the remedy: the first steps are left out
    expected, _ = example_attribution(trace.steps, trace.examples, gamma, trace.num_steps)
    torch.testing.assert_close(late, expected.float())
    contrast = TraceExplainer(model, train, trace, layer="fc", per_step="contrast").explain(test_x)
    gamma = Explainer(model, trace, layers=["fc"]).explain([{"x": x[None]} for x in test_x])["fc"].gamma
    gamma = gamma / gamma.abs().mean(0, keepdim=True)  # each step over its mean size across the queries
    expected, _ = example_attribution(trace.steps, trace.examples, gamma, trace.num_steps)
    torch.testing.assert_close(contrast, expected.float())


def test_quanda_metrics_judge_the_adapter(run):
    """quanda's top-k cardinality and class detection (identical class) on our scores, against a hand count."""
    model, train, trace = run
    test_x = torch.randn(6, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    targets = model(test_x).argmax(1)
    scores = TraceExplainer(model, train, trace, layer="head", score="cosine").explain(test_x, targets=targets)

    cardinality = TopKCardinalityMetric(model, train, top_k=3)
    cardinality.update(scores)
    top = scores.topk(3, dim=1).indices
    assert cardinality.compute()["score"] == pytest.approx(len(top.unique()) / top.numel())

    detection = ClassDetectionMetric(model, train, s=1)
    detection.update(scores, test_targets=targets)
    labels = torch.tensor([int(train[i][1]) for i in range(len(train))])
    same = (labels[scores.argmax(1)] == targets).float().mean()
    assert detection.compute()["score"] == pytest.approx(float(same))


def test_self_influence_is_each_examples_own_score_and_opposed_turns_its_sign(run):
    model, train, trace = run
    xs = torch.stack([train[i][0] for i in range(len(train))])
    own = TraceExplainer(model, train, trace, layer="head").explain(xs).diag()
    assert own.abs().max() > 0
    torch.testing.assert_close(TraceExplainer(model, train, trace, layer="head").self_influence(batch_size=16), own)
    opposed = TraceExplainer(model, train, trace, layer="head", self_influence="opposed")
    torch.testing.assert_close(opposed.self_influence(batch_size=16), -own)


def test_bad_arguments_are_named(run):
    model, train, trace = run
    with pytest.raises(ValueError, match="'gamma' or 'cosine'"):
        TraceExplainer(model, train, trace, layer="fc", score="tracin")
    with pytest.raises(ValueError, match="use None or 'contrast'"):
        TraceExplainer(model, train, trace, layer="fc", per_step="zscore")
    with pytest.raises(ValueError, match="use 'score' or 'opposed'"):
        TraceExplainer(model, train, trace, layer="fc", self_influence="flip")
    with pytest.raises(ValueError, match="warmup_steps must be between 0 and"):
        TraceExplainer(model, train, trace, layer="fc", warmup_steps=trace.num_steps)
    with pytest.raises(Exception, match="Traced layers: conv, fc, head"):
        TraceExplainer(model, train, trace, layer="nope")
