"""Explainer: attribute each traced layer's pre-activation for query inputs to training steps.

For every query and traced layer it captures the layer's input ``H`` and
pre-activation ``Z`` (final weights) and the query gradient ``G``, then makes
one pass over the trace's chunks (a DataLoader, so Lightning can shard it over
devices) computing per step ``gamma_t`` (eq. 6), ``cos_t`` (eq. 7) and
``||H D_t^T + d_t||`` (:func:`~lightning_tracetrain.explain.attribution.attribute_chunk`).
The same pass sums the deltas, so the check that the model holds the traced
weights costs no second read of the trace.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_tracetrain import functional as Fx
from lightning_tracetrain.batch import batch_inputs
from lightning_tracetrain.exceptions import TraceDivergedError, TraceFormatError, TraceMismatchError
from lightning_tracetrain.explain.attribution import LayerAttribution, LayerQueries, attribute_chunk, query_state
from lightning_tracetrain.explain.chunks import ChunkLoader, TraceChunks
from lightning_tracetrain.explain.loading import Trust, load_model, saved_checkpoints, steps_until
from lightning_tracetrain.trace import StorageMode, Trace
from lightning_tracetrain.trainer import quiet_logs, quiet_trainer

_FIELDS = ("gamma", "cos", "norm")


class Explainer(pl.LightningModule):
    """Attributes traced layers' pre-activations for query inputs to the training steps of a trace.

    Args:
        model: The trained model (its traced layers hold the weights after ``stop`` steps; checked
            during the pass).
        trace: A :class:`~lightning_tracetrain.Trace` or its path.
        layers: Layers to explain (default: every traced layer).
        stop: Explain with the first ``stop`` steps (default: all); the model must hold ``weights_at(stop)``.
        norms: Also compute ``||H D_t^T + d_t||`` and ``cos_t`` (ridge plots); ``False`` computes gamma only,
            which is much cheaper for many queries.

    Example:
        >>> explainer = Explainer(model, "runs/digits/trace")  # doctest: +SKIP
        >>> result = explainer.explain([test_batch_of_one])  # doctest: +SKIP
        >>> result["net.fc2"].gamma.shape  # (queries, steps)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        trace: Trace | str | Path,
        layers: Sequence[str] | None = None,
        stop: int | None = None,
        norms: bool = True,
    ) -> None:
        super().__init__()
        self.norms = norms
        self.model = model.eval()
        self.trace = trace if isinstance(trace, Trace) else Trace(trace)
        if self.trace.num_steps == 0:
            raise TraceFormatError(
                f"The trace at {self.trace.path} has no committed step: nothing to explain. Train longer, or check "
                "that the run that wrote it did not stop before its first commit."
            )
        self.stop = self.trace.num_steps if stop is None else stop
        self.layer_names = [self.trace.layer(name).name for name in layers or self.trace.layers]  # unknown: listed
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise TraceMismatchError(
                f"The model has no layer {', '.join(missing)} that the trace recorded; the checkpoint and the trace "
                f"are of different models (trace: {self.trace.spec.describe()})."
            )
        self.layers = {n: modules[n] for n in self.layer_names}
        for name, module in self.layers.items():
            for param, shape in self.trace.layer(name).params.items():
                if tuple(getattr(module, param).shape) != shape:
                    raise TraceMismatchError(
                        f"Layer {name}.{param} of the model has shape {tuple(getattr(module, param).shape)}, the trace "
                        f"recorded {shape}: the checkpoint and the trace are of different models."
                    )
        self._initial = {n: self.trace.initial(n) for n in self.layer_names}
        self._queries: dict[str, LayerQueries] = {}
        self._out: dict[str, dict[str, Tensor]] = {}
        self._covered = torch.zeros(0)
        self._unattributed: dict[str, Tensor] = {}  # low-rank layers: <G, R> per query, set by the weight check
        self.global_rank_ = 0  # the process's rank in the last pass (0 on one device)

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | Path,
        trace: Trace | str | Path,
        layers: Sequence[str] | None = None,
        norms: bool = True,
        trust: Trust = Trust(),
    ) -> Explainer:
        """Rebuild the traced LightningModule from a Lightning checkpoint and pair it with its trace.

        The model class is the one the trace recorded (imported only if ``trust`` allows it); a
        checkpoint saved before the end of training is explained with the steps it had taken.
        """
        trace = trace if isinstance(trace, Trace) else Trace(trace)
        model, global_step = load_model(trace, ckpt, trust)
        return cls(model, trace, layers, stop=steps_until(trace, global_step), norms=norms)

    # ------------------------------------------------------------------ queries

    @torch.no_grad()
    def set_queries(self, batches: Sequence[Any]) -> Tensor:
        """Capture every layer's input and pre-activation for each query (one batch of one example each).

        Returns the model's logits for the queries, ``(Q, classes)``.
        """
        device = next(self.model.parameters()).device
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in self.layer_names}
        hooks = [module.register_forward_hook(_capture(seen[name])) for name, module in self.layers.items()]
        logits = []
        try:
            for batch in batches:
                count = {name: len(rows) for name, rows in seen.items()}
                logits.append(self.model(batch_inputs(move_data_to_device(batch, device))).reshape(1, -1))
                for name, rows in seen.items():  # a layer called several times keeps its first call
                    del rows[count[name] + 1 :]
        finally:
            for h in hooks:
                h.remove()
        silent = [name for name, rows in seen.items() if len(rows) != len(batches)]
        if silent:
            raise TraceMismatchError(f"The model's forward did not call the traced layer(s) {', '.join(silent)}.")
        self._queries = {
            name: query_state(
                module,
                [x for x, _ in seen[name]],
                [z for _, z in seen[name]],
                {p: getattr(module, p).detach() for p in self.trace.layer(name).params},
            )
            for name, module in self.layers.items()
        }
        self._reset_outputs()
        return torch.cat(logits)

    def _reset_outputs(self) -> None:
        q, t = len(next(iter(self._queries.values())).xs), self.stop
        device = next(self.model.parameters()).device
        rows = int(self.trace.steps.example_stop[t - 1]) if t else 0
        self._out = {}
        for name in self.layer_names:
            out = {k: torch.zeros(q, t, device=device) for k in _FIELDS}
            if self.trace.spec.is_factored(name):
                out["rows"] = torch.zeros(q, rows, device=device)
            for param, shape in self.trace.layer(name).params.items():
                out[f"sum/{param}"] = torch.zeros(shape, dtype=torch.float64, device=device)
            self._out[name] = out
        self._covered = torch.zeros(t, device=device)  # how often each step was computed (1 after the pass)

    # ------------------------------------------------------------------ the pass over the trace

    def chunk_loader(self, num_workers: int = 0, min_items: int = 1) -> ChunkLoader:
        """The trace's chunks as a DataLoader (pinned memory when a GPU is used); at least ``min_items`` items
        (the number of devices)."""
        return ChunkLoader(
            TraceChunks(self.trace, self.layer_names, self.stop, min_items),
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context="spawn" if num_workers else None,  # zarr's I/O thread does not survive fork
        )

    def on_predict_start(self) -> None:
        if not self._queries:
            raise RuntimeError("No queries: call set_queries(batches) before the pass over the trace.")
        self._queries = {n: q.to(self.device) for n, q in self._queries.items()}
        self._out = {n: {k: v.to(self.device).zero_() for k, v in o.items()} for n, o in self._out.items()}
        self._covered = self._covered.to(self.device).zero_()
        self._unattributed = {}

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> None:
        start, stop = batch["start"], batch["stop"]
        self._covered[start:stop] += 1
        for name, module in self.layers.items():
            deltas, factors = batch["layers"][name]
            part = attribute_chunk(module, self._queries[name], deltas, factors, self.norms)
            out = self._out[name]
            for key, value in part.items():
                if key.startswith("sum/"):
                    out[key] += value
                elif key == "rows":
                    assert factors is not None
                    out["rows"][:, factors.row_start : factors.row_start + value.shape[1]] = value
                else:
                    out[key][:, start:stop] = value

    def on_predict_end(self) -> None:
        """Sum the devices' shares, then check that every step was computed once and the weights match."""
        if self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            self._covered = strategy.reduce(self._covered, reduce_op="sum")
            self._out = {
                n: {k: strategy.reduce(v, reduce_op="sum") for k, v in o.items()} for n, o in self._out.items()
            }
        missing = torch.nonzero(self._covered != 1).flatten()
        if len(missing):
            raise RuntimeError(
                f"Steps {missing[:5].tolist()} were computed {self._covered[missing[:5]].tolist()} times instead of "
                "once: the chunk loader must give every chunk to exactly one device (do not replace its sampler)."
            )
        self._check_weights()
        self.global_rank_ = self.trainer.global_rank

    def _check_weights(self) -> None:
        """The model's layers must hold ``initial + sum of the first stop deltas`` (summed during the pass).

        A compact trace sums to them within one step's rounding (error feedback): the tolerance
        grows by ``2**-keepbits`` of the largest total change of the parameter. A low-rank weight's
        products lack a residual ``R``: it is what the model holds beyond them, its share ``<G, R>`` is
        reported as unattributed, and it is checked against the residual the run stored with the
        checkpoint when the trace has it (the bias, stored exactly, is always checked). A mismatch is told
        apart: non-finite weights mean the run diverged (the trace knows at which step); others, that
        the checkpoint and the trace come from different runs. (Damaged chunks fail their checksums
        while the pass reads them.)
        """
        keepbits = self.trace.spec.keepbits if self.trace.storage == StorageMode.compact else None
        for name, module in self.layers.items():
            for param, w0 in self._initial[name].items():
                change = self._out[name][f"sum/{param}"].cpu()
                traced = (w0.double() + change).float()
                actual = getattr(module, param).detach().float().cpu()
                if not (torch.isfinite(actual).all() and torch.isfinite(traced).all()):
                    raise TraceDivergedError(self._diverged(f"{name}.{param}"))
                if param == "weight" and self.trace.spec.is_lowrank(name):
                    traced = self._unattributed_share(name, w0.double() + change, actual)
                    if traced is None:
                        continue
                atol = 1e-5 + (0.0 if keepbits is None else 2.0**-keepbits * float(change.abs().max()))
                if not torch.allclose(actual, traced, rtol=1e-4, atol=atol):
                    raise TraceMismatchError(
                        f"Layer {name}.{param} of the model does not match the trace at {self.trace.path} after "
                        f"{self.stop} steps: the checkpoint and the trace are from different models or runs."
                        f"{saved_checkpoints(self.trace) or ' Use the checkpoint saved by the traced run.'}"
                    )

    def _unattributed_share(self, name: str, traced: Tensor, actual: Tensor) -> Tensor | None:
        """Keep ``<G, R>`` for a low-rank weight (``R``: the model's weight minus the stored products); return the
        traced weight with the stored residual to check against, or None when the trace has none for ``stop``."""
        grads = self._queries[name].grads["weight"]
        residual = (actual.double() - traced).to(grads.device)
        self._unattributed[name] = (grads.double() * residual[None]).flatten(1).sum(1).float()
        steps, stored = self.trace.residual(name)
        return (traced + stored["weight"].double()).float() if steps == self.stop else None

    def _diverged(self, param: str) -> str:
        steps = self.trace.steps
        bad = np.flatnonzero(steps.nonfinite[: self.stop])
        where = (
            f"training diverged at step {int(bad[0])} (global step {int(steps.global_step[bad[0]])}), the first whose "
            "change of the weights was not finite"
            if len(bad)
            else "training diverged (this trace does not record where: it predates steps/nonfinite)"
        )
        return (
            f"{param} of the model holds NaN or infinite weights: {where}. Explanations of a diverged run mean "
            "nothing: retrain with a smaller learning rate or gradient clipping, or explain a checkpoint saved before "
            "the divergence."
        )

    def explain(self, batches: Sequence[Any], trainer: pl.Trainer | None = None) -> dict[str, LayerAttribution]:
        """Attribute every layer for the queries (one batch of one example each), in one pass over the trace."""
        self.set_queries(batches)
        return self.run(trainer)

    def run(
        self,
        trainer: pl.Trainer | None = None,
        num_workers: int = 0,
        devices: int | str = 1,
        accelerator: str = "auto",
        strategy: str = "auto",
    ) -> dict[str, LayerAttribution]:
        """One pass over the trace for the queries set by :meth:`set_queries`; returns :meth:`results`.

        With ``devices > 1`` Lightning's DDP shards the chunks over the devices and the partial
        results are summed, so every process returns the same, complete result (rank 0 is the one
        to write files: ``explainer.global_rank_``). The default Trainer keeps autograd on
        (``inference_mode=False``): query gradients need it.
        """
        ours = trainer is None
        trainer = trainer or quiet_trainer(
            accelerator=accelerator, devices=devices, strategy=strategy, inference_mode=False, progress_bar=True
        )
        with warnings.catch_warnings(), quiet_logs() if ours else contextlib.nullcontext():
            # predict_step fills self._out and returns None on purpose
            warnings.filterwarnings("ignore", message="predict returned None")
            trainer.predict(self, self.chunk_loader(num_workers, trainer.world_size), return_predictions=False)
        return self.results()

    def results(self) -> dict[str, LayerAttribution]:
        """Attributions of the last pass, per layer (on the CPU)."""
        out = {}
        for name, module in self.layers.items():
            queries = self._queries[name]
            params = {p: v.to(queries.zs[0].device) for p, v in self._initial[name].items()}
            init = torch.stack(
                [(z * Fx.layer_output(module, x, params)).sum() for x, z in zip(queries.xs, queries.zs, strict=True)]
            )
            z_sq = torch.stack([z.pow(2).sum() for z in queries.zs])
            o = self._out[name]
            rows = o["rows"].cpu() if "rows" in o else None
            unattributed = self._unattributed[name].cpu() if name in self._unattributed else None
            out[name] = LayerAttribution(
                o["gamma"].cpu(), o["cos"].cpu(), o["norm"].cpu(), init.cpu(), z_sq.cpu(), rows, unattributed
            )
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def configure_optimizers(self) -> None:
        return None


def _capture(rows: list[tuple[Tensor, Tensor]]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        rows.append((args[0].detach(), out.detach()))

    return hook
