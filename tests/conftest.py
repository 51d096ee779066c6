"""Shared fixtures: tiny datasets and models in the batch protocol, and a quiet Trainer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain import IndexedDataset
from lightning_tracetrain.trainer import quiet_trainer as _quiet_trainer


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """The library's quiet Trainer, on the CPU unless a test asks otherwise."""
    return _quiet_trainer(**{"accelerator": "cpu", **kwargs})


TRACE_RUN = Path(__file__).with_name("trace_run.py")

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian package chromium is not installed (.ci/run installs it)"
)


def headless_chromium(page: Path) -> tuple[list[str], str]:
    """Open ``page`` in headless Chromium (offline, scripts run): its console lines and the DOM it built."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=8000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line], proc.stdout


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests call the CLIs with explicit arguments, as from Python; pytest's own arguments are not theirs."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


def start_run(out: Any, *args: str, script: Path = TRACE_RUN) -> subprocess.Popen:
    """``trace_run.py`` (or ``script``) in a process of its own; its stderr is kept for assertion messages."""
    return subprocess.Popen(
        [sys.executable, str(script), str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for a run and close its pipes: its exit status and the tail of its stderr."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, (err or b"").decode()[-3000:]


def committed(path: Any) -> int:
    """The ``steps_committed`` attribute of the trace at ``path`` as a polling reader sees it; -1 before it exists."""
    import zarr

    try:
        return int(zarr.open_group(str(path), mode="r").attrs.get("steps_committed", -1))
    except (FileNotFoundError, ValueError):
        return -1


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a run (no chance to clean up, as a crash) and close its pipes."""
    proc.kill()
    proc.communicate()


def image_loader(n: int = 40, batch_size: int = 8, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """``n`` random 1x6x6 images of 3 classes, following the batch protocol."""
    g = torch.Generator().manual_seed(seed)
    ds = IndexedDataset(TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


class TinyCNN(pl.LightningModule):
    """Conv(stride 2, padding 1) -> ReLU -> Linear -> ReLU -> Linear(no bias)."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr / 10)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Snapshots(pl.Callback):
    """Keeps a copy of every parameter after every optimizer step (key k: after k steps, a resumed run included)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Tensor]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states = {trainer.global_step: self._state(pl_module)}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.states[trainer.global_step] = self._state(pl_module)

    @staticmethod
    def _state(module: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in module.named_parameters()}


def assert_matches_snapshots(
    trace: Any, snapshots: dict[int, dict[str, Tensor]], atol: float = 1e-6, bound: dict[str, Tensor] | None = None
) -> None:
    """The trace's weights after every step ``k`` of ``snapshots`` (from cumulative sums: one read per layer)
    equal the snapshot, within ``atol`` or, per parameter, the elementwise ``bound`` (compact traces)."""
    for layer in trace.layers:
        initial = trace.initial(layer)
        for param, deltas in trace.deltas(layer).items():
            weights = torch.cat([initial[param][None].double(), initial[param].double() + deltas.double().cumsum(0)])
            key = f"{layer}.{param}"
            for k, state in snapshots.items():
                error = (weights[k] - state[key].double()).abs()
                limit = atol if bound is None else bound[key].double() + atol
                assert bool((error <= limit).all()), (key, k, float((error - limit).max()))


def replay_error_feedback(deltas: Tensor, keepbits: int) -> Tensor:
    """What ``storage="compact"`` stores for exact ``deltas`` (steps first): round(delta + carry), carrying the
    rounding error to the next step (float32, as the writer does)."""
    import numcodecs
    import numpy as np

    rounder, carry, out = numcodecs.BitRound(keepbits), np.zeros(deltas.shape[1:], np.float32), []
    for d in deltas.float().numpy():
        value = d + carry
        stored = rounder.encode(value).view(np.float32).reshape(value.shape)
        carry = value - stored
        out.append(stored)
    return torch.from_numpy(np.stack(out))


def replay_power_steps(deltas: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """What ``storage="lowrank"`` stores for exact ``deltas`` of one weight (steps first): one warm-started power
    iteration per step from the recorder's seeded first Q, as ``(P, Q)`` stacked over the steps."""
    from lightning_tracetrain import functional as Fx
    from lightning_tracetrain.recording.lowrank import SEED

    q = torch.randn(Fx.matrix_shape(deltas.shape[1:])[1], rank, generator=torch.Generator().manual_seed(SEED))
    ps, qs = [], []
    for delta in deltas:
        p, q = Fx.power_step(delta.reshape(Fx.matrix_shape(delta.shape)), q)
        ps.append(p)
        qs.append(q)
    return torch.stack(ps), torch.stack(qs)


def assert_reconstructs(trace: Any, module: nn.Module, atol: float = 1e-5) -> None:
    """For every traced layer: initial + sum of deltas equals the module's current weights."""
    modules = dict(module.named_modules())
    for layer in trace.layers:
        final = trace.final(layer)
        for param, value in final.items():
            expected = getattr(modules[layer], param).detach()
            torch.testing.assert_close(value, expected, atol=atol, rtol=1e-5, msg=f"{layer}.{param}")


class PlainNet(pl.LightningModule):
    """Conv -> ReLU -> Linear(36, 32) -> ReLU -> Linear(32, 3) on 1x6x6 images, plain SGD (every storage mode).

    With ``storage="factored"`` and batches of 8, ``fc`` is stored as per-example factors (8 x (36 + 32) < 36 x 32)
    and ``head`` is not (8 x (32 + 3) > 32 x 3).
    """

    def __init__(self, momentum: float = 0.0, penalty: float = 0.0, bias_lr: float | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(36, 32)
        self.head = nn.Linear(32, 3)
        self.momentum, self.penalty, self.bias_lr = momentum, penalty, bias_lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        return loss + self.penalty * self.fc.weight.pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.bias_lr is None:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)
        rest = [p for n, p in self.named_parameters() if n != "fc.bias"]
        return torch.optim.SGD([{"params": rest}, {"params": [self.fc.bias], "lr": self.bias_lr}], lr=0.1)


class TinyGNN(pl.LightningModule):
    """GINConv with a torch Linear MLP, GCNConv (whose linear map is PyG's Linear), a Linear head."""

    def __init__(self, momentum: float = 0.0) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv, GINConv

        self.gin = GINConv(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8)))
        self.gcn = GCNConv(8, 8)
        self.out = nn.Linear(8, 2)
        self.momentum = momentum

    def forward(self, batch: Any) -> Tensor:
        from torch_geometric.nn import global_mean_pool

        h = F.relu(self.gin(batch.x, batch.edge_index))
        h = F.relu(self.gcn(h, batch.edge_index))
        return self.out(global_mean_pool(h, batch.batch))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch), batch.y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)


def tiny_graphs(n: int = 12) -> list[Any]:
    """``n`` random graphs of 4-6 nodes with 3 features; graph ``i`` has label ``i % 2``."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(0)
    graphs = []
    for i in range(n):
        nodes = 4 + i % 3
        edges = torch.randint(0, nodes, (2, 2 * nodes), generator=g)
        graphs.append(Data(x=torch.randn(nodes, 3, generator=g), edge_index=edges, y=torch.tensor([i % 2])))
    return graphs


@pytest.fixture
def make_trainer() -> Callable[..., pl.Trainer]:
    return quiet_trainer


def reset_s3fs() -> None:
    """Close the aiohttp sessions of every cached S3 filesystem and forget them, so that the next
    filesystem reads the environment afresh and no session is left for the interpreter to warn about."""
    import s3fs
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        if getattr(fs, "_s3", None) is None:
            continue
        if fs.asynchronous:  # zarr's: its session lives on zarr's event loop
            sync(fs._s3.close())
        else:
            s3fs.S3FileSystem.close_session(fs.loop, fs._s3)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3() -> Any:
    """An S3-compatible server (moto) on 127.0.0.1 with a bucket ``traces``; the environment points boto at it.

    The server runs in a process of its own (as a real one would), so it does not compete with the
    tests for the interpreter. Yields the storage options that reach it; skips without moto or s3fs.
    """
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency (pip install -e .[dev])")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is needed for s3:// traces (pip install -e .[s3])")
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("the moto S3 server did not start")
            time.sleep(0.1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }.items():
                mp.setenv(key, value)
            reset_s3fs()
            s3fs.S3FileSystem().mkdir("traces")
            yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    finally:
        reset_s3fs()
        server.terminate()
        server.wait(timeout=30)


def make_fake_ogbg_ppa(root: Any, n_graphs: int = 60, seed: int = 0) -> Any:
    """A tiny ogbg-ppa in OGB's on-disk layout: headerless gzipped CSVs, species split, RELEASE_v1.txt.

    Graphs have 4-8 nodes with local edge ids, 7 edge features in [0, 1], and
    labels from 4 imbalanced classes (ppa's are imbalanced too).
    """
    from pathlib import Path

    import numpy as np
    import pandas as pd

    folder = Path(root) / "ogbg_ppa"
    (folder / "raw").mkdir(parents=True)
    (folder / "split" / "species").mkdir(parents=True)
    (folder / "RELEASE_v1.txt").write_text("a test fixture in OGB's layout\n")
    rng = np.random.default_rng(seed)
    nodes = rng.integers(4, 9, n_graphs)
    edges = [np.stack([rng.integers(0, n, 2 * n), rng.integers(0, n, 2 * n)], 1) for n in nodes]
    labels = rng.choice(4, size=n_graphs, p=[0.4, 0.3, 0.2, 0.1])

    def write(name: str, values: Any) -> None:
        pd.DataFrame(values).to_csv(folder / name, compression="gzip", header=False, index=False)

    write("raw/edge.csv.gz", np.concatenate(edges))
    write("raw/edge-feat.csv.gz", rng.random((sum(len(e) for e in edges), 7)).round(3))
    write("raw/num-node-list.csv.gz", nodes)
    write("raw/num-edge-list.csv.gz", [len(e) for e in edges])
    write("raw/graph-label.csv.gz", labels)
    order = rng.permutation(n_graphs)
    cut1, cut2 = int(0.6 * n_graphs), int(0.8 * n_graphs)
    write("split/species/train.csv.gz", np.sort(order[:cut1]))
    write("split/species/valid.csv.gz", np.sort(order[cut1:cut2]))
    write("split/species/test.csv.gz", np.sort(order[cut2:]))
    return Path(root)
