"""Baselines: Representer Points and TracIn against their defining properties and a direct loop."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import TinyCNN, image_loader, quiet_trainer
from torch.utils.data import DataLoader

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.baselines import RepresenterPoints
from lightning_tracetrain.baselines.tracin import TracIn, epoch_checkpoints


def _trained(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN()
    loader = image_loader(n=30, batch_size=10)
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


def test_tracin_equals_a_direct_loop_over_checkpoints_rebuilt_from_the_trace(tmp_path):
    model, trace, data = _trained(tmp_path)
    assert epoch_checkpoints(trace) == [3, 6, 9]
    tracin = TracIn(model, trace, layers=["fc", "head"])
    train = [next(iter(DataLoader(data, batch_size=6)))]
    test = [{"x": torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))}]
    scores = tracin.scores(train, test)
    cosines = tracin.scores(train, test, cosine=True)
    self_influence = tracin.self_influence(train)
    for layer in ("fc", "head"):
        expected = torch.zeros(2, 6, dtype=torch.float64)
        expected_cos = torch.zeros(2, 6, dtype=torch.float64)
        expected_self = torch.zeros(6, dtype=torch.float64)
        for k in (3, 6, 9):
            net = copy.deepcopy(model)
            for name, params in trace.weights_at(k).items():
                for p, v in params.items():
                    getattr(dict(net.named_modules())[name], p).data.copy_(v)
            lr = float(trace.steps.lr[k - 1, 0])
            predicted = net(test[0]["x"]).argmax(-1)

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
