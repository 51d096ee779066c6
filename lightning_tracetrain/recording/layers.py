"""Which layers can be traced: modules whose weight enters the output linearly.

A traced layer computes ``Z = H W^T + b`` over some unfolding ``H`` of its input
(torch ``Linear``, ``Conv1d/2d/3d`` and PyG's ``Linear``, which is *not* a
``torch.nn.Linear``). Layers are named by their qualified name in
``named_modules()`` of the LightningModule.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from lightning_tracetrain.exceptions import UnknownLayerError

_TORCH_LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _linear_types() -> tuple[type[nn.Module], ...]:
    """Torch's linear modules, and PyG's ``Linear`` when PyG is loaded (a model cannot hold one otherwise)."""
    pyg = sys.modules.get("torch_geometric.nn.dense.linear")
    return _TORCH_LINEAR_TYPES if pyg is None else (*_TORCH_LINEAR_TYPES, pyg.Linear)


def is_traceable(module: nn.Module) -> bool:
    """True for a module whose ``weight`` is used linearly and is trainable."""
    if not isinstance(module, _linear_types()):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and not isinstance(weight, nn.parameter.UninitializedParameter)


def traceable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All traceable layers of ``model`` by qualified name, in module order.

    Layers whose weight does not require grad (frozen) are left out.
    """
    return {
        name: module
        for name, module in model.named_modules()
        if name and is_traceable(module) and module.weight.requires_grad
    }


def select_layers(model: nn.Module, layers: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Resolve a layer selection to ``{name: module}`` in module order.

    ``layers`` is ``None`` (every traceable layer), a qualified name, a glob
    pattern (``"features.*"``) or a list of either. Each entry must match at
    least one traceable layer; otherwise the error lists the traceable ones.
    """
    available = traceable_layers(model)
    if not available:
        raise UnknownLayerError(
            f"{type(model).__name__} has no traceable layer (torch Linear/Conv1d/Conv2d/Conv3d or PyG Linear "
            "with a trainable weight); there is nothing to trace."
        )
    if layers is None:
        return available
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen: set[str] = set()
    for pattern in patterns:
        matched = _match(pattern, available)
        if not matched:
            raise UnknownLayerError(
                f"Layer {pattern!r} is not a traceable layer of {type(model).__name__}. "
                f"Traceable layers: {', '.join(available)}."
            )
        chosen.update(matched)
    return {name: module for name, module in available.items() if name in chosen}


def _match(pattern: str, names: Iterable[str]) -> list[str]:
    names = list(names)
    if pattern in names:
        return [pattern]
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def layer_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a traced layer that the trace stores: ``weight`` and, if present, ``bias``."""
    params = {"weight": module.weight}
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        params["bias"] = bias
    return params
