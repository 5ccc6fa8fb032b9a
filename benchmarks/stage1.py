"""Stage-1 training throughput: rayclust's trainer against a TAC-style DataLoader loop.

What it measures
----------------
TAC's official code feeds stage 1 through a ``torch.utils.data.Dataset`` whose ``__getitem__(i)``
returns the anchor's text and image features plus the features of one neighbour drawn with
``np.random.choice`` from row i of each k-NN table; a ``DataLoader`` then collates 512 such
4-tuples in Python and every batch is copied to the device. The model itself is tiny (two
Linear-BN-ReLU-Linear heads on 512-d features), so that per-sample Python work, not the
arithmetic, can dominate the epoch. rayclust's ``Stage1Trainer`` keeps features and neighbour
tables on the device, draws all neighbours of an epoch with one ``randint`` and gathers each
batch by tensor indexing.

This script runs, in one process and on the same synthetic data:

1. rayclust's ``Stage1Trainer`` with ``TACObjective`` (TACConfig(epochs, batch_size));
2. a TAC-style reference loop written here (``TACNeighbourDataset`` + ``DataLoader``) with the
   same ``TACHeads`` model, the same ``TACCriterion`` loss and Adam(lr 1e-3, betas (0.9, 0.99));
3. rayclust's ``Stage1Trainer`` with ``SEICObjective`` (SEICConfig(epochs, batch_size)), as an
   extra line (SEIC needs no neighbour tables).

and prints, per method, total seconds, seconds per epoch, anchor samples per second and the final
clustering accuracy (Hungarian ACC of ``argmax predict_proba`` against the generating labels, so
the timing comparison also shows that both loops learn), plus the reference/rayclust time ratio
for TAC.

Data: ``make_vmf_features`` gives N x d image features in K vMF clusters with paired text vectors;
the synthetic text vectors stand in directly for TAC's text counterparts (no noun retrieval). Both
50-NN tables are computed once with ``rayclust.method.neighbours.knn`` before any timed region;
that time is reported on its own line.

Fairness notes: both TAC loops run the same number of epochs, steps (N // batch, drop_last) and
FLOPs, and accumulate the epoch loss on the device (no per-step ``.item()``), so the difference is
the data path. Each timed region starts before the model is built and ends after the last
optimiser step (with ``torch.cuda.synchronize()`` on CUDA); rayclust's includes its host-to-device
copy of the inputs. An untimed warm-up (one short epoch of each loop on a subset) runs first so
that CUDA context creation and kernel selection are not charged to whichever loop runs first.

Run::

    uv run python benchmarks/stage1.py            # 50,000 x 512, K=10, 20 epochs, batch 512
    uv run python benchmarks/stage1.py --quick    # smoke run, a few seconds
    uv run python benchmarks/stage1.py --device cuda --workers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rayclust.config import SEICConfig, TACConfig
from rayclust.method.heads import TACHeads
from rayclust.method.metrics import cluster_accuracy
from rayclust.method.neighbours import knn
from rayclust.method.seic import SEICObjective
from rayclust.method.tac import TACCriterion, TACObjective
from rayclust.method.trainer import Stage1Inputs, Stage1Trainer, predict_proba
from rayclust.synthetic import make_vmf_features

QUICK = {"n": 4000, "epochs": 2}


# ---------------------------------------------------------------------------------------------
# The TAC-style reference (the shape of TAC's official training code)


class TACNeighbourDataset(Dataset):
    """TAC's dataset: anchors plus one random neighbour per modality, drawn per sample.

    Features are host-side numpy arrays; ``__getitem__(i)`` returns
    ``(text[i], image[i], text[j], image[l])`` with ``j = np.random.choice(text_nn[i])`` and
    ``l = np.random.choice(image_nn[i])``, exactly one fresh draw per sample per epoch.
    """

    def __init__(self, image: np.ndarray, text: np.ndarray, image_nn: np.ndarray,
                 text_nn: np.ndarray):
        self.image, self.text = image, text
        self.image_nn, self.text_nn = image_nn, text_nn

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitem__(self, i: int):
        text_neighbour = np.random.choice(self.text_nn[i])
        image_neighbour = np.random.choice(self.image_nn[i])
        return (self.text[i], self.image[i], self.text[text_neighbour],
                self.image[image_neighbour])


def _seed_worker(worker_id: int) -> None:
    """Each DataLoader worker gets its own numpy stream derived from torch's per-worker seed."""
    np.random.seed(torch.initial_seed() % 2**32)


def train_reference(image: np.ndarray, text: np.ndarray, image_nn: np.ndarray,
                    text_nn: np.ndarray, n_clusters: int, cfg: TACConfig, device: torch.device,
                    workers: int, seed: int) -> TACHeads:
    """TAC's loop: DataLoader(shuffle, drop_last) -> per-batch .to(device) -> 4 head calls."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = TACHeads(image.shape[1], n_clusters).to(device)
    criterion = TACCriterion(cfg.distill_temperature, cfg.entropy_weight).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.99))
    loader = DataLoader(TACNeighbourDataset(image, text, image_nn, text_nn),
                        batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, worker_init_fn=_seed_worker if workers else None,
                        generator=torch.Generator().manual_seed(seed))
    for _ in range(cfg.epochs):
        model.train()
        criterion.train()
        total = torch.zeros((), device=device)
        for text_a, image_a, text_n, image_n in loader:
            text_a, image_a = text_a.to(device), image_a.to(device)
            text_n, image_n = text_n.to(device), image_n.to(device)
            logits = model(image_a, text_a, text_n, image_n)
            p_v, p_t, q_t, q_v = (torch.softmax(x, dim=1) for x in logits)
            loss, _ = criterion(p_v, p_t, q_v, q_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
    return model


# ---------------------------------------------------------------------------------------------
# Timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: dict):
    _sync(device)
    started = time.perf_counter()
    yield
    _sync(device)
    out["seconds"] = time.perf_counter() - started


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accuracy(model: torch.nn.Module, image: torch.Tensor, labels: np.ndarray) -> float:
    pred = predict_proba(model, image).argmax(dim=1).cpu().numpy()
    return cluster_accuracy(labels, pred)


def summarise(name: str, seconds: float, epochs: int, samples_per_epoch: int,
              acc: float) -> dict:
    return {"method": name, "seconds": seconds, "seconds_per_epoch": seconds / epochs,
            "samples_per_second": samples_per_epoch * epochs / seconds, "acc": acc}


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=50_000, help="samples")
    p.add_argument("--dim", type=int, default=512, help="feature dimension")
    p.add_argument("--clusters", type=int, default=10, help="K")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--knn", type=int, default=50, help="neighbours per row (TAC: 50)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers of the reference loop (TAC uses 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: n={QUICK['n']}, epochs={QUICK['epochs']}")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.epochs = QUICK["n"], QUICK["epochs"]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    steps = args.n // args.batch_size
    if steps < 1:
        sys.exit(f"--n {args.n} is smaller than --batch-size {args.batch_size}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({name or platform.machine()}) | torch {torch.__version__} | "
          f"CPUs {os.cpu_count()} | torch threads {torch.get_num_threads()} | "
          f"python {platform.python_version()}")
    print(f"data: n={args.n} dim={args.dim} K={args.clusters} knn={args.knn} | "
          f"epochs={args.epochs} batch={args.batch_size} ({steps} steps/epoch) | "
          f"reference workers={args.workers} | seed={args.seed}")

    seed_everything(args.seed)
    started = time.perf_counter()
    data = make_vmf_features(args.n, args.clusters, args.dim, seed=args.seed)
    print(f"features: {time.perf_counter() - started:.2f} s")

    image = torch.from_numpy(data.image)
    text = torch.from_numpy(data.text)
    k = min(args.knn, args.n - 1)
    knn_time: dict = {}
    with timed(device, knn_time):
        image_nn = knn(image.to(device), k).cpu()
        text_nn = knn(text.to(device), k).cpu()
    print(f"knn: two {k}-NN tables of {args.n} rows on {device}: {knn_time['seconds']:.2f} s "
          f"(untimed below)")

    inputs = Stage1Inputs(image, text, image_nn, text_nn)  # host tensors; fit() moves them
    tac_cfg = TACConfig(epochs=args.epochs, batch_size=args.batch_size)
    seic_cfg = SEICConfig(epochs=args.epochs, batch_size=args.batch_size)
    host = (data.image, data.text, image_nn.numpy(), text_nn.numpy())

    if not args.no_warmup:  # one short epoch of each loop, on a subset
        m = min(args.n, 8 * args.batch_size)
        sub = Stage1Inputs(image[:m], text[:m], image_nn[:m] % m, text_nn[:m] % m)
        warm = TACConfig(epochs=1, batch_size=args.batch_size)
        Stage1Trainer(TACObjective(warm, args.clusters), device, seed=args.seed).fit(sub)
        Stage1Trainer(SEICObjective(SEICConfig(epochs=1, batch_size=args.batch_size),
                                    args.clusters), device, seed=args.seed).fit(sub)
        train_reference(*(a[:m] for a in host[:2]), *(a[:m] % m for a in host[2:]),
                        args.clusters, warm, device, args.workers, args.seed)
        _sync(device)

    results = []

    seed_everything(args.seed)
    t: dict = {}
    with timed(device, t):
        state = Stage1Trainer(TACObjective(tac_cfg, args.clusters), device, seed=args.seed
                              ).fit(inputs)
    results.append(summarise("rayclust TAC", t["seconds"], args.epochs, steps * args.batch_size,
                             accuracy(state.model, image, data.labels)))

    seed_everything(args.seed)
    t = {}
    with timed(device, t):
        model = train_reference(*host, args.clusters, tac_cfg, device, args.workers, args.seed)
    results.append(summarise(f"TAC-style DataLoader (workers={args.workers})", t["seconds"],
                             args.epochs, steps * args.batch_size,
                             accuracy(model, image, data.labels)))

    seed_everything(args.seed)
    t = {}
    with timed(device, t):
        state = Stage1Trainer(SEICObjective(seic_cfg, args.clusters), device, seed=args.seed
                              ).fit(inputs)
    # SEIC keeps a trailing batch (drop_last=False), so it sees every sample each epoch
    results.append(summarise("rayclust SEIC", t["seconds"], args.epochs, args.n,
                             accuracy(state.model, image, data.labels)))

    print()
    width = max(len(r["method"]) for r in results)
    print(f"{'method':<{width}}  {'total s':>9}  {'s/epoch':>8}  {'samples/s':>11}  {'ACC':>6}")
    for r in results:
        print(f"{r['method']:<{width}}  {r['seconds']:>9.2f}  {r['seconds_per_epoch']:>8.3f}  "
              f"{r['samples_per_second']:>11,.0f}  {r['acc']:>6.3f}")
    ratio = results[1]["seconds"] / results[0]["seconds"]
    print(f"\nTAC reference / rayclust time ratio: {ratio:.2f}x")

    report = {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "config": {key: getattr(args, key) for key in
                   ("n", "dim", "clusters", "epochs", "batch_size", "knn", "workers", "seed",
                    "quick")},
        "knn_seconds": knn_time["seconds"], "results": results,
        "tac_reference_over_rayclust": ratio,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
