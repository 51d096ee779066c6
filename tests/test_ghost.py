"""Ghost-sample batch norm against a direct weighted mean and variance."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from lightning_tracetrain.functional import ghost_moments, real_cross_entropy
from lightning_tracetrain.singleclass import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNormNodes,
    convert_batchnorm,
    set_ghost_mask,
)


def weighted_moments(x: torch.Tensor, ghost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow reference: each ghost row weighs 1, the real rows 1 in total (per row, spread over its positions)."""
    x = x.double()
    n_real = int((~ghost).sum())
    row_weight = torch.where(ghost, torch.ones(len(ghost)), torch.full((len(ghost),), 1.0 / n_real)).double()
    # move channels last and flatten positions: (rows, positions, C); a row's weight is spread over its positions
    flat = x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
    w = (row_weight / flat.shape[1])[:, None, None].expand(-1, flat.shape[1], 1)
    total = w.sum()
    mean = (w * flat).sum((0, 1)) / total
    var = (w * (flat - mean) ** 2).sum((0, 1)) / total
    return mean, var


@pytest.mark.parametrize("shape", [(13, 5), (13, 5, 7), (13, 3, 4, 6)])
def test_ghost_moments_equal_a_direct_weighted_mean_and_variance(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
    x[:4] += 5.0  # the single-class rows sit elsewhere than the ghosts
    ghost = torch.tensor([False] * 4 + [True] * 9)
    mean, var = ghost_moments(x, ghost, [0, *range(2, x.dim())])
    ref_mean, ref_var = weighted_moments(x, ghost)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, atol=1e-6, rtol=1e-6)


def test_the_printed_algorithm_2_would_fail_this_reference():
    """Guards the two typo fixes: the paper's formulas differ from the weighted statistics."""
    x = torch.randn(10, 3)
    x[:2] += 4.0
    ghost = torch.tensor([False] * 2 + [True] * 8)
    real, gh = x[~ghost], x[ghost]
    mb, mg, vb, vg = real.mean(0), gh.mean(0), real.var(0, unbiased=False), gh.var(0, unbiased=False)
    printed_mu = mg + (mg - mb) / 9
    printed_var = (8 / 9) * vg + vb + (8 / 9) * (mg - mb) ** 2 / 9
    mean, var = weighted_moments(x, ghost)
    assert not torch.allclose(printed_mu.double(), mean, atol=1e-3)
    assert not torch.allclose(printed_var.double(), var, atol=1e-3)


@pytest.mark.parametrize(("module", "shape"), [(GhostBatchNorm1d(4), (10, 4)), (GhostBatchNorm2d(4), (10, 4, 3, 3))])
def test_train_and_eval_outputs_and_running_stats(module, shape):
    torch.manual_seed(0)
    with torch.no_grad():
        module.weight.uniform_(0.5, 2.0)
        module.bias.uniform_(-1, 1)
    x = torch.randn(shape) * 2 + 1
    ghost = torch.tensor([False] * 3 + [True] * 7)
    module.train()
    out = module(x, ghost)
    mean, var = weighted_moments(x, ghost)
    view = [1, -1] + [1] * (len(shape) - 2)
    expected = (x.double() - mean.view(view)) / torch.sqrt(var.view(view) + module.eps)
    expected = expected * module.weight.double().view(view) + module.bias.double().view(view)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # running statistics: momentum 0.1 from (0, 1), variance with BatchNorm's Bessel factor n/(n-1)
    n = x.numel() // x.shape[1]
    torch.testing.assert_close(module.running_mean.double(), 0.1 * mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(module.running_var.double(), 0.9 + 0.1 * var * n / (n - 1), atol=1e-6, rtol=1e-6)
    assert int(module.num_batches_tracked) == 1
    # eval mode normalizes with the running statistics and ignores the mask
    module.eval()
    rm, rv = module.running_mean.double().view(view), module.running_var.double().view(view)
    expected = (x.double() - rm) / torch.sqrt(rv + module.eps) * module.weight.double().view(view)
    torch.testing.assert_close(
        module(x, ghost).double(), expected + module.bias.double().view(view), atol=1e-5, rtol=1e-5
    )


def test_a_batch_without_ghosts_is_ordinary_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    plain, ghostly = nn.BatchNorm2d(3), GhostBatchNorm2d(3)
    torch.testing.assert_close(ghostly(x), plain(x))
    torch.testing.assert_close(ghostly(x, torch.zeros(8, dtype=torch.bool)), plain(x))
    torch.testing.assert_close(ghostly.running_var, plain.running_var)


def test_graph_batches_weigh_ghost_nodes():
    """Ghost nodes are the nodes of ghost graphs; the real graphs' nodes weigh 1 in total."""
    torch.manual_seed(0)
    graphs = [Data(x=torch.randn(3 + i, 4) + (3.0 if i < 2 else 0.0), ghost=torch.tensor([i >= 2])) for i in range(5)]
    batch = Batch.from_data_list(graphs)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    convert_batchnorm(model, nodes="1")
    assert isinstance(model[1], GhostBatchNormNodes)
    set_ghost_mask(model, batch)
    node_ghost = batch.ghost[batch.batch]
    h = model[0](batch.x)
    out = model(batch.x)
    mean, var = weighted_moments(h.detach(), node_ghost)
    expected = (h.double() - mean) / torch.sqrt(var + 1e-5) * model[1].weight.double() + model[1].bias.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    model.eval()
    ref = nn.BatchNorm1d(4).eval()
    ref.load_state_dict(model[1].state_dict())
    torch.testing.assert_close(model(batch.x), ref(model[0](batch.x)))


def test_convert_keeps_parameters_buffers_and_device_and_sequential_models_use_the_set_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm1d(3))
    model(torch.randn(6, 1, 4, 4))  # give the batch norms running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    convert_batchnorm(model)
    assert isinstance(model[1], GhostBatchNorm2d) and isinstance(model[4], GhostBatchNorm1d)
    assert model[1].weight is weight
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    x, ghost = torch.randn(6, 1, 4, 4), torch.tensor([False, False, True, True, True, True])
    set_ghost_mask(model, {"x": x, "ghost": ghost})
    h = model[:4](x)  # the first batch norm already uses the ghost statistics
    out = model(x)
    mean, var = weighted_moments(h.detach(), ghost)
    bn = model[4]
    expected = (h.double() - mean) / torch.sqrt(var + bn.eps) * bn.weight.double() + bn.bias.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    set_ghost_mask(model, None)
    assert model[1].ghost_mask is None and model[4].ghost_mask is None


def test_wrong_mask_length_and_bad_conversion_are_clear():
    with pytest.raises(ValueError, match="ghost mask of 3 rows for an input of 5 rows"):
        GhostBatchNorm1d(2)(torch.randn(5, 2), torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="No BatchNorm1d"):
        convert_batchnorm(nn.Sequential(nn.BatchNorm1d(2)), nodes="nope")


def test_loss_uses_real_rows_only():
    logits = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 2])
    ghost = torch.tensor([False, False, True, True, True])
    torch.testing.assert_close(real_cross_entropy(logits, y, ghost), nn.functional.cross_entropy(logits[:2], y[:2]))
    only_ghosts = real_cross_entropy(logits, y, torch.ones(5, dtype=torch.bool))
    assert only_ghosts.item() == 0.0 and only_ghosts.requires_grad
