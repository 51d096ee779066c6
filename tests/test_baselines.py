"""Baselines: Representer Points and TracIn against their defining properties and a direct loop."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyCNN, image_loader, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.baselines import RepresenterPoints
from lightning_tracetrain.baselines.representer import layer_features
from lightning_tracetrain.baselines.tracin import TracIn, checkpoint_weights, epoch_checkpoints


class Decaying(TinyCNN):
    """TinyCNN with batch norm after fc and a learning rate halved every epoch (checkpoints differ in eta)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.fc(F.relu(self.conv(x)).flatten(1)))))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def _trained(tmp_path, n: int = 30):
    torch.manual_seed(0)
    model = Decaying()
    loader = image_loader(n=n, batch_size=10)
    quiet_trainer(max_epochs=3, callbacks=[TraceCallback(tmp_path / "t")]).fit(model, loader)
    return model.eval(), Trace(tmp_path / "t"), loader.dataset


def test_representer_sum_reproduces_the_fine_tuned_logits(tmp_path):
    model, _, data = _trained(tmp_path)
    rp = RepresenterPoints(model, lam=0.003).fit(DataLoader(data, batch_size=8))
    direct, representer_sum = rp.logits([{"x": torch.randn(5, 1, 6, 6)}])
    torch.testing.assert_close(representer_sum, direct, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rp.alpha.sum(1), torch.zeros(30, dtype=torch.float64), atol=1e-12, rtol=0)
    # the stationarity the theorem needs: W == sum_i alpha_i f_i^T
    torch.testing.assert_close(rp.weight, rp.alpha.T @ rp.features, atol=1e-6, rtol=1e-6)


def test_representer_does_not_depend_on_batch_size_or_order(tmp_path):
    model, _, data = _trained(tmp_path)
    reference = RepresenterPoints(model).fit(DataLoader(data, batch_size=30)).alpha
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = RepresenterPoints(model).fit(DataLoader(data, batch_size=7, sampler=perm)).alpha
    torch.testing.assert_close(shuffled, reference[perm], atol=1e-7, rtol=1e-5)


def test_representer_conventions_differ_by_the_constant_feature_only(tmp_path):
    model, _, data = _trained(tmp_path)
    test = [{"x": torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))}]
    ours = RepresenterPoints(model).fit(DataLoader(data, batch_size=8))
    authors = RepresenterPoints(model, convention="authors").fit(DataLoader(data, batch_size=8))
    values, predicted = ours.values(test)
    raw, predicted_again = authors.values(test)
    assert torch.equal(predicted, predicted_again)
    # ours adds up to the fine-tuned logit of the predicted class ...
    logits, _ = ours.logits(test)
    torch.testing.assert_close(values.sum(1), logits[torch.arange(5), predicted], atol=1e-6, rtol=1e-6)
    # ... the authors' is alpha_ic <f_i, f_t> on the raw features: the two differ by alpha_ic exactly
    torch.testing.assert_close(values - raw, ours.alpha[:, predicted].T, atol=1e-9, rtol=1e-9)
    features, _, _ = layer_features(model, model.head, test)
    expected = (features[:, :-1] @ ours.features[:, :-1].T) * ours.alpha[:, predicted].T
    torch.testing.assert_close(raw, expected)
    with pytest.raises(ValueError, match="convention must be 'logits' or 'authors'"):
        RepresenterPoints(model, convention="paper").fit(DataLoader(data, batch_size=8))


def test_checkpoint_weights_sum_the_learning_rates_of_their_interval():
    lr = np.array([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025])
    assert checkpoint_weights(lr, [3, 6, 9]) == pytest.approx([0.3, 0.15, 0.075])
    assert checkpoint_weights(lr, [9]) == pytest.approx([0.525])  # one checkpoint stands for every step


def test_tracin_equals_a_direct_loop_over_checkpoints_rebuilt_from_the_trace(tmp_path):
    model, trace, data = _trained(tmp_path)
    assert epoch_checkpoints(trace) == [3, 6, 9]
    tracin = TracIn(model, trace, layers=["fc", "head"])
    assert tracin.lrs == pytest.approx([3 * 0.1, 3 * 0.05, 3 * 0.025])  # the schedule halves the rate each epoch
    train = [next(iter(DataLoader(data, batch_size=6)))]
    test = [{"x": torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))}]
    scores = tracin.scores(train, test)
    cosines = tracin.scores(train, test, cosine=True)
    self_influence = tracin.self_influence(train)
    assert not any(s.requires_grad for s in (*scores.values(), *cosines.values(), *self_influence.values()))
    predicted = model(test[0]["x"]).argmax(-1)  # the final model's prediction, the target at every checkpoint
    for layer in ("fc", "head"):
        expected = torch.zeros(2, 6, dtype=torch.float64)
        expected_cos = torch.zeros(2, 6, dtype=torch.float64)
        expected_self = torch.zeros(6, dtype=torch.float64)
        for k in (3, 6, 9):
            net = copy.deepcopy(model)
            for name, params in trace.weights_at(k).items():
                for p, v in params.items():
                    getattr(dict(net.named_modules())[name], p).data.copy_(v)
            lr = float(trace.steps.lr[k - 3 : k, 0].sum())  # the epoch's steps

            def grad(x, y, net=net, layer=layer):
                loss = F.cross_entropy(net(x[None]), y[None])
                ps = [getattr(dict(net.named_modules())[layer], p) for p in trace.layer(layer).params]
                return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]).double()

            g_test = [grad(test[0]["x"][q], predicted[q]) for q in range(2)]
            g_train = [grad(train[0]["x"][i], train[0]["y"][i]) for i in range(6)]
            for i in range(6):
                expected_self[i] += lr * g_train[i].dot(g_train[i])
                for q in range(2):
                    expected[q, i] += lr * g_test[q].dot(g_train[i])
                    expected_cos[q, i] += lr * F.cosine_similarity(g_test[q], g_train[i], dim=0)
        torch.testing.assert_close(scores[layer], expected, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(cosines[layer], expected_cos, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(self_influence[layer], expected_self, atol=1e-6, rtol=1e-4)
    # the model handed in keeps its final weights
    torch.testing.assert_close(tracin.model.head.weight, model.head.weight)


def test_tracin_agrees_with_captums_tracincp_called_the_usual_way(tmp_path):
    """captum's TracInCP with the final model's predictions as test labels and each checkpoint's eta from its
    loader: the same scores (1e-4 relative) and the same top-10 training examples for 20 test inputs."""
    tracincp = pytest.importorskip("captum.influence").TracInCP
    model, trace, data = _trained(tmp_path, n=60)
    x_train = torch.stack([data[i]["x"] for i in range(len(data))])
    y_train = torch.stack([data[i]["y"] for i in range(len(data))])
    x_test = torch.randn(20, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    predicted = model(x_test).argmax(-1)
    tracin = TracIn(model, trace)
    ours = tracin.scores([{"x": x_train, "y": y_train}], [{"x": x_test}])
    eta = dict(zip(map(str, tracin.checkpoints), tracin.lrs, strict=True))

    def load(net: nn.Module, checkpoint: str) -> float:
        modules = dict(net.named_modules())
        with torch.no_grad():
            for layer, params in trace.weights_at(int(checkpoint)).items():
                for p, value in params.items():
                    getattr(modules[layer], p).copy_(value)
        return eta[checkpoint]

    for layer in trace.layers:
        net = copy.deepcopy(model).eval()
        reference = tracincp(
            net,
            TensorDataset(x_train, y_train),
            checkpoints=list(eta),
            checkpoints_load_func=load,
            layers=[layer],
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=16,
        ).influence((x_test, predicted))
        torch.testing.assert_close(ours[layer], reference.double(), rtol=1e-4, atol=1e-7 * float(reference.abs().max()))
        top_ours, top_captum = ours[layer].topk(10).indices, reference.topk(10).indices
        assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(top_ours, top_captum, strict=True)), layer
