"""ClaDec: the explained classifier stays frozen (weights and batch-norm statistics), the decoders learn."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain import IndexedDataset
from lightning_tracetrain.baselines.cladec import ClaDec, encode, reconstruct_all
from lightning_tracetrain.workloads.models import DigitsCNN


def _data(n: int = 64) -> IndexedDataset:
    g = torch.Generator().manual_seed(0)
    return IndexedDataset(TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)))


def _classifier() -> DigitsCNN:
    torch.manual_seed(0)
    model = DigitsCNN(channels=4, hidden=16, batch_norm=True)
    model.train()
    with torch.no_grad():  # non-trivial running statistics to protect
        model(torch.rand(32, 1, 8, 8))
    return model.eval()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_cladec_trains_the_decoder_and_leaves_the_classifier_frozen(alpha):
    model = _classifier()
    before = _state(model)
    cladec = ClaDec(model, "net.fc1", (1, 8, 8), alpha=alpha, lr=1e-2)
    loader = DataLoader(_data(), batch_size=16)
    x = torch.cat([b["x"] for b in loader])
    decoder_before = copy.deepcopy(cladec.decoder)
    loss_before = float((cladec.reconstruct(x) - x).pow(2).mean())
    quiet_trainer(max_epochs=5).fit(cladec, loader)
    assert not cladec.classifier.training
    after = cladec.classifier.state_dict()
    for k, v in before.items():  # weights, running_mean/var and num_batches_tracked: all unchanged
        assert torch.equal(after[k], v), k
    for k, v in model.state_dict().items():  # the caller's model is not touched either
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(cladec.decoder.parameters(), decoder_before.parameters(), strict=True)
    )
    x_hat, y = reconstruct_all(cladec, loader)
    assert x_hat.shape == x.shape and len(y) == len(x)
    if alpha == 0.0:
        assert float((x_hat - x).pow(2).mean()) < loss_before


def test_reference_autoencoder_trains_a_fresh_encoder_of_the_same_architecture():
    model = _classifier()
    reference = ClaDec(model, "net.conv2", (1, 8, 8), reference=True, lr=1e-2)
    encoder_before = copy.deepcopy(reference.encoder)
    assert not torch.equal(reference.encoder.net.conv1.weight, model.net.conv1.weight)  # freshly initialized
    quiet_trainer(max_epochs=2).fit(reference, DataLoader(_data(), batch_size=16))
    assert not torch.equal(reference.encoder.net.conv1.weight, encoder_before.net.conv1.weight)
    assert torch.equal(reference.classifier.net.conv1.weight, model.net.conv1.weight)


def test_encode_is_the_layers_output_in_the_full_forward():
    model = _classifier()
    x = torch.rand(3, 1, 8, 8)
    seen = []
    handle = model.net.fc1.register_forward_hook(lambda m, a, out: seen.append(out))
    model(x)
    handle.remove()
    torch.testing.assert_close(encode(model, model.net.fc1, x), seen[0])


def test_bad_arguments_name_the_fix():
    model = _classifier()
    with pytest.raises(ValueError, match=r"no layer 'net\.fc9'.*net\.fc1"):
        ClaDec(model, "net.fc9", (1, 8, 8))
    with pytest.raises(ValueError, match="alpha must be in"):
        ClaDec(model, "net.fc1", (1, 8, 8), alpha=1.5)
    with pytest.raises(ValueError, match="reconstruction only"):
        ClaDec(model, "net.fc1", (1, 8, 8), alpha=0.5, reference=True)
