"""Explainer: attribute each traced layer's pre-activation for query inputs to training steps.

For every query and traced layer it captures the layer's input ``H`` and
pre-activation ``Z`` (final weights), computes the query gradient ``G``, then
streams the trace's delta chunks through a DataLoader and computes, per step,
``gamma_t`` (eq. 6), ``cos_t`` (eq. 7) and ``||H D_t^T + d_t||``. One pass over
the trace serves all queries. The math lives in :mod:`lightning_tracetrain.functional`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_tracetrain import functional as Fx
from lightning_tracetrain.exceptions import TraceFormatError, TraceMismatchError
from lightning_tracetrain.trace import Trace
from lightning_tracetrain.trace.schema import ClassSpec


class DeltaChunks(Dataset):
    """Item ``i``: the deltas of the chosen layers for the ``i``-th range of steps (a stored chunk).

    With ``min_items`` larger than the number of chunks (more devices than chunks), chunks are split
    into equal parts so that every device gets work. Opens the trace lazily, so it works in DataLoader
    worker processes.
    """

    def __init__(
        self,
        path: str,
        layers: Sequence[str],
        stop: int,
        chunk_steps: int,
        min_items: int = 1,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.layers, self.stop, self.storage_options = path, list(layers), stop, storage_options
        if stop < min_items:
            raise ValueError(
                f"The pass covers {stop} steps, fewer than the {min_items} devices sharing it: use {stop} devices "
                "or fewer."
            )
        self.ranges = [(s, min(s + chunk_steps, stop)) for s in range(0, stop, chunk_steps)]
        while len(self.ranges) < min_items:  # split the longest range in halves (stays within one chunk)
            i = max(range(len(self.ranges)), key=lambda j: self.ranges[j][1] - self.ranges[j][0])
            a, b = self.ranges[i]
            self.ranges[i : i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
        self._trace: Trace | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[int, Future[dict[str, Any]]] = {}
        self._last: int | None = None

    def __len__(self) -> int:
        return len(self.ranges)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get a fresh reader and no threads
        return {**self.__dict__, "_trace": None, "_pool": None, "_ahead": {}, "_last": None}

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Chunk ``i``; the chunk this reader will most likely be asked for next is read meanwhile.

        The next index follows the stride of the last two requests (1 on one device, the number of
        devices under DDP's sampler), so reading and decoding overlap the compute on the chunk.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-read")
        future = self._ahead.pop(i, None) or self._pool.submit(self._read, i)
        stride = 1 if self._last is None or i <= self._last else i - self._last
        self._last = i
        for stale in [j for j in self._ahead if j < i]:  # an index order we did not foresee
            self._ahead.pop(stale).cancel()
        if i + stride < len(self.ranges) and i + stride not in self._ahead:
            self._ahead[i + stride] = self._pool.submit(self._read, i + stride)
        return future.result()

    def _read(self, i: int) -> dict[str, Any]:
        if self._trace is None:
            self._trace = Trace(self.path, self.storage_options)
        start, stop = self.ranges[i]
        chunks = {lay: self._trace.read_chunk(lay, start, stop) for lay in self.layers}
        return {
            "start": start,
            "stop": stop,
            "deltas": {lay: deltas for lay, (deltas, _) in chunks.items()},
            "factors": {lay: rows for lay, (_, rows) in chunks.items() if rows is not None},
        }


@dataclass
class LayerAttribution:
    """Per-step attribution of one layer's pre-activation, for all queries of a call."""

    gamma: Tensor  # (Q, steps): <Z, H D_t^T + d_t>
    cos: Tensor  # (Q, steps)
    norm: Tensor  # (Q, steps): ||H D_t^T + d_t||
    init: Tensor  # (Q,): gamma_0, the initialization's share
    z_sq: Tensor  # (Q,): ||Z||^2
    # factored layers (storage="factored"): each training example row's exact share of gamma, (Q, example rows);
    # the rows of step t (Trace.steps.example_start/stop) sum to gamma[:, t]
    rows: Tensor | None = None

    @property
    def residual(self) -> Tensor:
        """Relative completeness residual ``(gamma_0 + sum_t gamma_t - ||Z||^2) / ||Z||^2`` (zero up to rounding)."""
        total = self.init.double() + self.gamma.double().sum(1)
        return (total - self.z_sq.double()) / self.z_sq.double().clamp_min(1e-30)


@dataclass
class _Query:
    x: Tensor  # the layer's input for this query
    z: Tensor  # its pre-activation with the final weights


def _capture(name: str, seen: dict[str, _Query]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        seen.setdefault(name, _Query(args[0].detach(), out.detach()))  # the first call (a layer may be reused)

    return hook


class Explainer(pl.LightningModule):
    """Attributes traced layers' pre-activations for query inputs to the training steps of a trace.

    Args:
        model: The trained model (its traced layers hold the weights after ``stop`` steps).
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
        trace: Trace | str,
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
        for name in layers or []:
            self.trace.layer(name)  # raises UnknownLayerError listing the traced layers
        self.layer_names = list(layers or self.trace.layers)
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise TraceMismatchError(
                f"The model has no layer {', '.join(missing)} that the trace recorded; the checkpoint and the trace "
                f"are of different models (trace: {self.trace.spec.describe()})."
            )
        self.layers = {n: modules[n] for n in self.layer_names}
        self._check_weights()
        self._queries: dict[str, list[_Query]] = {}
        self._grads: dict[str, dict[str, Tensor]] = {}
        self._z_norm: dict[str, Tensor] = {}
        self._out: dict[str, dict[str, Tensor]] = {}
        self._covered = torch.zeros(0)
        self.global_rank_ = 0  # the process's rank in the last pass (0 on one device)

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | Path, trace: Trace | str | Path, layers: Sequence[str] | None = None, norms: bool = True
    ) -> Explainer:
        """Rebuild the traced LightningModule from a Lightning checkpoint and pair it with its trace.

        The model class is the one the trace recorded; a checkpoint saved before
        the end of training is explained with the steps it had taken.
        """
        trace = trace if isinstance(trace, Trace) else Trace(trace)
        model, global_step = load_model(trace, ckpt)
        return cls(model, trace, layers, stop=steps_until(trace, global_step), norms=norms)

    # ------------------------------------------------------------------ checks

    def _check_weights(self) -> None:
        """The model's traced layers must hold ``initial + sum of the first stop deltas``.

        A compact trace sums to them within one step's rounding (error feedback): the tolerance
        grows by ``2**-keepbits`` of the largest total change of the parameter.
        """
        weights = self.trace.weights_at(self.stop)
        keepbits = self.trace.spec.keepbits if self.trace.storage == "compact" else None
        for name in self.layer_names:
            initial = self.trace.initial(name) if keepbits is not None else {}
            for param, value in weights[name].items():
                actual = getattr(self.layers[name], param).detach().float().cpu()
                atol = 1e-5
                if keepbits is not None:
                    atol += 2.0**-keepbits * float((value - initial[param]).abs().max())
                if actual.shape != value.shape or not torch.allclose(actual, value, rtol=1e-4, atol=atol):
                    raise TraceMismatchError(
                        f"Layer {name}.{param} of the model does not match the trace at {self.trace.path} after "
                        f"{self.stop} steps: the checkpoint and the trace are from different models or runs. "
                        "Use the checkpoint saved by the traced run."
                    )

    # ------------------------------------------------------------------ queries

    @torch.no_grad()
    def set_queries(self, batches: Sequence[Any]) -> Tensor:
        """Capture every layer's input and pre-activation for each query (one batch of one example each).

        Returns the model's logits for the queries, ``(Q, classes)``.
        """
        device = next(self.model.parameters()).device
        captured: dict[str, list[_Query]] = {n: [] for n in self.layer_names}
        logits = []
        for batch in batches:
            seen: dict[str, _Query] = {}
            hooks = [module.register_forward_hook(_capture(name, seen)) for name, module in self.layers.items()]
            try:
                batch = move_data_to_device(batch, device)
                logits.append(self.model(batch["x"] if isinstance(batch, Mapping) else batch).reshape(1, -1))
            finally:
                for h in hooks:
                    h.remove()
            for name in self.layer_names:
                captured[name].append(seen[name])
        self._queries = captured
        self._grads = {}
        for name, module in self.layers.items():
            params = {p: getattr(module, p).detach() for p in self.trace.layer(name).params}
            grads = [Fx.query_gradient(module, q.x, params)[1] for q in captured[name]]
            self._grads[name] = {p: torch.stack([g[p] for g in grads]) for p in params}
        self._z_norm = {n: torch.stack([q.z.norm() for q in qs])[:, None] for n, qs in captured.items()}
        self._reset_outputs()
        return torch.cat(logits)

    def _reset_outputs(self) -> None:
        q, t = len(next(iter(self._queries.values()))), self.stop
        device = next(self.model.parameters()).device
        self._out = {
            name: {k: torch.zeros(q, t, device=device) for k in ("gamma", "cos", "norm")} for name in self.layer_names
        }
        rows = int(self.trace.steps.example_stop[t - 1]) if t else 0
        for name in self.layer_names:
            if self.trace.spec.is_factored(name):
                self._out[name]["rows"] = torch.zeros(q, rows, device=device)
        self._covered = torch.zeros(t, device=device)  # how often each step was computed (1 after the pass)

    def _to(self, device: torch.device) -> None:
        """Move the queries' captured tensors and the outputs to ``device`` (where the Trainer put the model)."""
        self._queries = {n: [_Query(q.x.to(device), q.z.to(device)) for q in qs] for n, qs in self._queries.items()}
        self._grads = {n: {p: g.to(device) for p, g in gs.items()} for n, gs in self._grads.items()}
        self._z_norm = {n: z.to(device) for n, z in self._z_norm.items()}
        self._out = {n: {k: v.to(device) for k, v in o.items()} for n, o in self._out.items()}
        self._covered = self._covered.to(device)

    def on_predict_start(self) -> None:
        if not self._queries:
            raise RuntimeError("No queries: call set_queries(batches) before the pass over the trace.")
        self._to(self.device)
        self._covered.zero_()
        for out in self._out.values():
            for v in out.values():
                v.zero_()

    def on_predict_end(self) -> None:
        """With several devices each computed its share of the chunks: sum the shares on every device."""
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1:
            self._covered = strategy.reduce(self._covered, reduce_op="sum")
            for out in self._out.values():
                for k in out:
                    out[k] = strategy.reduce(out[k], reduce_op="sum")
        missing = torch.nonzero(self._covered != 1).flatten()
        if len(missing):
            raise RuntimeError(
                f"Steps {missing[:5].tolist()} were computed {self._covered[missing[:5]].tolist()} times instead of "
                "once: the chunk loader must give every chunk to exactly one device (do not replace its sampler)."
            )
        self.global_rank_ = self.trainer.global_rank

    # ------------------------------------------------------------------ the pass over the trace

    def chunk_loader(self, num_workers: int = 0, min_items: int = 1) -> DataLoader:
        """The trace's delta chunks as a DataLoader (pinned memory when a GPU is used); at least
        ``min_items`` items (the number of devices)."""
        return DataLoader(
            DeltaChunks(
                self.trace.path,
                self.layer_names,
                self.stop,
                self.trace.spec.chunk_steps,
                min_items,
                self.trace.storage_options,
            ),
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context="spawn" if num_workers else None,  # zarr's I/O thread does not survive fork
            persistent_workers=False,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> None:
        start, stop = batch["start"], batch["stop"]
        self._covered[start:stop] += 1
        for name, module in self.layers.items():
            deltas = {p: d.to(self._grads[name][p].device, non_blocking=True) for p, d in batch["deltas"][name].items()}
            gamma = Fx.step_gammas(deltas, self._grads[name]).T  # (Q, T)
            out = self._out[name]
            out["gamma"][:, start:stop] = gamma
            if name in batch["factors"]:
                f = batch["factors"][name]
                queries = self._queries[name]
                device = queries[0].z.device
                shares = Fx.row_gammas(
                    f.inputs.to(device), f.outputs.to(device), [q.x for q in queries], [q.z for q in queries],
                    bias="bias" in self._grads[name],
                )  # fmt: skip
                out["rows"][:, f.row_start : f.row_start + shares.shape[1]] = shares
            if not self.norms:
                continue
            norms = Fx.contribution_norms(module, [q.x for q in self._queries[name]], deltas)
            out["norm"][:, start:stop] = norms
            out["cos"][:, start:stop] = Fx.cosines(gamma, self._z_norm[name], norms)

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
        trainer = trainer or pl.Trainer(
            accelerator=accelerator, devices=devices, strategy=strategy, logger=False, inference_mode=False,
            enable_model_summary=False,
        )  # fmt: skip
        with warnings.catch_warnings():  # predict_step fills self._out and returns None on purpose
            warnings.filterwarnings("ignore", message="predict returned None")
            trainer.predict(self, self.chunk_loader(num_workers, trainer.world_size), return_predictions=False)
        return self.results()

    def results(self) -> dict[str, LayerAttribution]:
        """Attributions of the last pass, per layer (on the CPU)."""
        out = {}
        for name, module in self.layers.items():
            initial = self.trace.initial(name)
            params = {p: v.to(self._grads[name][p].device) for p, v in initial.items()}
            init = torch.stack([(q.z * Fx.layer_output(module, q.x, params)).sum() for q in self._queries[name]])
            z_sq = torch.stack([q.z.pow(2).sum() for q in self._queries[name]])
            o = self._out[name]
            rows = o["rows"].cpu() if "rows" in o else None
            out[name] = LayerAttribution(
                o["gamma"].cpu(), o["cos"].cpu(), o["norm"].cpu(), init.cpu(), z_sq.cpu(), rows
            )
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def configure_optimizers(self) -> None:
        return None


# ---------------------------------------------------------------------- loading


def import_class(spec: ClassSpec) -> type:
    module, _, name = spec.class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise TraceMismatchError(
            f"Cannot import {spec.class_path}, which the trace recorded; install the code that trained the model."
        ) from exc


def load_model(trace: Trace, ckpt: str | Path) -> tuple[pl.LightningModule, int]:
    """The traced LightningModule with the checkpoint's weights, and the checkpoint's global step."""
    cls = import_class(trace.module)
    try:
        model = cls.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=False)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise TraceMismatchError(
            f"The checkpoint {ckpt} does not fit {trace.module.class_path}, the model the trace at {trace.path} "
            f"recorded: the checkpoint and the trace are of different models ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]})."
        ) from exc
    with fsspec.open(str(ckpt), "rb") as f:  # a local file or a URL such as s3://bucket/last.ckpt
        step = int(torch.load(f, map_location="cpu", weights_only=False).get("global_step", -1))
    return model.eval(), step


def steps_until(trace: Trace, global_step: int) -> int:
    """How many recorded steps a checkpoint saved at ``global_step`` had taken."""
    if global_step < 0:
        return trace.num_steps
    return int(np.searchsorted(trace.steps.global_step, global_step, side="left"))


# ---------------------------------------------------------------------- aggregation


def example_attribution(
    trace: Trace, step_scores: Tensor, stop: int, split: bool = True, rows: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Algorithm 1 over the trace's real rows: ``(Q, num_examples)`` scores and each example's label.

    With ``split`` a step's score is divided equally over its real examples (gamma);
    without, every example of the step gets the whole score (the cosine ranking).
    With ``rows`` (:attr:`LayerAttribution.rows` of a factored layer) every example row
    gets its exact share of gamma instead, ghost rows included, so the scores of a step's
    examples add up to its gamma even in a mixed batch.
    """
    steps, ex = trace.steps, trace.examples
    rows_per_step = steps.example_stop[:stop] - steps.example_start[:stop]
    row_step = np.repeat(np.arange(stop), rows_per_step)
    n_rows = int(steps.example_stop[stop - 1])
    if rows is not None:
        keep = np.ones(n_rows, dtype=bool)
        step_scores, row_step, weight = rows[:, :n_rows], np.arange(n_rows), np.ones(n_rows)
    else:
        keep = ~ex.ghost[:n_rows]
        n_real = np.bincount(row_step[keep], minlength=stop).astype(np.float64)
        weight = 1.0 / np.maximum(n_real[row_step[keep]], 1) if split else np.ones(int(keep.sum()))
    index = ex.index[:n_rows][keep]
    num = int(index.max()) + 1 if len(index) else 0
    scores = Fx.example_scores(
        step_scores.double(),
        torch.from_numpy(row_step[keep]),
        torch.from_numpy(index),
        torch.from_numpy(weight),
        num,
    )
    labels = np.full(num, -1, dtype=np.int64)
    label = ex.label[:n_rows][keep]
    if label.ndim == 1:
        labels[index] = label
    return scores, torch.from_numpy(labels)


def class_attribution(example_scores: Tensor, labels: Tensor) -> dict[int, Tensor]:
    """Per class, the summed example scores ``(Q,)``: for single-class steps, the class's share of gamma."""
    return {int(c): example_scores[:, labels == c].sum(1) for c in torch.unique(labels) if c >= 0}


def ridge_densities(
    attribution: LayerAttribution, step_labels: np.ndarray, query: int, grid: Tensor, bandwidth: float = 0.1
) -> dict[int, Tensor]:
    """Algorithm 3: per class, the weighted KDE of ``cos_t`` over its steps (weights: ``||H D_t^T + d_t||``)."""
    cos, norm = attribution.cos[query], attribution.norm[query]
    labels = torch.from_numpy(step_labels[: cos.shape[0]])
    return {
        int(c): Fx.weighted_kde(cos[labels == c].double(), norm[labels == c].double(), grid.double(), bandwidth)
        for c in torch.unique(labels)
        if c >= 0
    }


__all__ = [
    "DeltaChunks",
    "Explainer",
    "LayerAttribution",
    "class_attribution",
    "example_attribution",
    "import_class",
    "load_model",
    "ridge_densities",
]
