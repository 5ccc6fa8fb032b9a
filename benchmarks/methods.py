"""Clustering quality of k-means, TAC and SEIC, with the language guard on and off.

For every setting and method the estimator is fitted once with the guard enabled; the table then
shows, against the true labels (Hungarian ACC, NMI, ARI; ALGORITHM.md 9):

* ``k-means``: the spherical k-means the guard compared against (one row per setting);
* ``<method> heads``: the trained heads alone (the guard off: ``argmax predict_proba``);
* ``<method> guarded``: what the guard returned (the heads or k-means, named in the column
  ``kept``), with the paired selection comparison ``z`` = (Q(k-means) - Q(heads)) / SE, where
  k-means replaces the heads only above ``guard.margin`` (2 by default);
* ``old guard``: what the previous guard (image-only neighbour agreement, margin 0) would have
  kept, for comparison.

Settings (synthetic, from ``rayclust.synthetic``; all use the real noun path, not paired text):

* ``separated``: 10 well-separated vMF clusters (kappa 400), nouns planted near each class;
* ``overlapping``: kappa 60, image clusters overlap (k-means near chance), nouns fit;
* ``unrelated``: kappa 150, only random distractor nouns (language cannot help);
* ``two-mode``: half the classes have two far-apart visual modes and two pairs of classes are
  visually close (``make_two_mode_features``, semantic weight 0.3), nouns fit;
* ``two-mode-unrelated``: the same images with only distractor nouns.

The first four are the settings of ``tests/test_quality_synthetic.py`` (at ``--n`` points).
With ``--embeddings E.parquet --vocabulary V.parquet`` the same rows are computed on your own
embeddings (``embedding`` column, L2-normalised CLIP vectors; ``label`` column or
``--labels L.parquet`` with ``id, label``; ``--clusters`` defaults to the number of labels).

Run::

    uv run python benchmarks/methods.py                       # default: n=2000, all settings
    uv run python benchmarks/methods.py --n 3000 --json methods.json
    uv run python benchmarks/methods.py --settings two-mode --methods tac
    uv run python benchmarks/methods.py --embeddings runs/x/embeddings --vocabulary \\
        runs/x/vocabulary --labels labels.parquet --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayclust.config import GuardConfig, KMeansConfig, SEICConfig, TACConfig  # noqa: E402
from rayclust.method import SEIC, TAC  # noqa: E402
from rayclust.method.metrics import label_metrics, neighbour_agreement  # noqa: E402
from rayclust.synthetic import make_two_mode_features, make_vmf_features  # noqa: E402

SETTINGS = {
    "separated": (make_vmf_features, dict(n_clusters=10, image_kappa=400, text_kappa=300,
                                          seed=1)),
    "overlapping": (make_vmf_features, dict(n_clusters=10, image_kappa=60, seed=0)),
    "unrelated": (make_vmf_features, dict(n_clusters=10, image_kappa=150, nouns_per_class=0,
                                          distractor_nouns=2000, seed=0)),
    "two-mode": (make_two_mode_features, dict(n_clusters=10, two_mode_classes=5, close_pairs=2,
                                              semantic_weight=0.3, seed=0)),
    "two-mode-unrelated": (make_two_mode_features, dict(n_clusters=10, two_mode_classes=5,
                                                        close_pairs=2, semantic_weight=0.3,
                                                        nouns_per_class=0,
                                                        distractor_nouns=2000, seed=0)),
}


def synthetic(name: str, n: int):
    make, kw = SETTINGS[name]
    f = make(n=n, **kw)
    return f.image, f.labels, f.nouns, f.noun_names, kw["n_clusters"]


def from_parquet(args):
    from rayclust import storage
    from rayclust.pipeline.run_tables import read_vocabulary
    from rayclust.tables import embedding_matrix

    table = storage.read_parquet(args.embeddings)
    image = np.array(embedding_matrix(table["embedding"]))  # writable, for torch
    labels = None
    if args.labels:
        lab = storage.read_parquet(args.labels, columns=["id", "label"])
        by_id = dict(zip(lab["id"].cast("string").to_pylist(),
                         lab["label"].cast("string").to_pylist()))
        ids = table["id"].cast("string").to_pylist()
        missing = [i for i in ids if i not in by_id]
        if missing:
            sys.exit(f"methods.py: {len(missing)} embedding id(s) have no label, e.g. "
                     f"{missing[0]!r}")
        labels = [by_id[i] for i in ids]
    elif "label" in table.column_names:
        labels = table["label"].cast("string").to_pylist()
    if labels is not None:
        labels = np.unique(np.asarray(labels), return_inverse=True)[1]
    k = args.clusters or (len(np.unique(labels)) if labels is not None else None)
    if k is None:
        sys.exit("methods.py: give --clusters (or labels to count them)")
    nouns, matrix = read_vocabulary(args.vocabulary, None)
    return image, labels, matrix, nouns, k


def old_guard(image, heads, kmeans) -> str:
    """The previous guard: image-space neighbour agreement (k=10, 20,000 sampled), margin 0."""
    u = F.normalize(torch.as_tensor(image).float(), dim=1)
    a = neighbour_agreement(u, torch.as_tensor(heads), 10, 20000, 0)
    b = neighbour_agreement(u, torch.as_tensor(kmeans), 10, 20000, 0)
    return "kmeans" if b > a else "heads"


def evaluate(setting, image, labels, nouns, names, k, args) -> list[dict]:
    rows = []
    kmeans_row = None
    for method in args.methods:
        if method == "seic":
            model = SEIC(k, SEICConfig(epochs=args.seic_epochs), device=args.device,
                         kmeans=KMeansConfig(), guard=GuardConfig(), seed=args.seed)
        else:
            model = TAC(k, TACConfig(epochs=args.tac_epochs), device=args.device,
                        kmeans=KMeansConfig(), guard=GuardConfig(), seed=args.seed)
        start = time.perf_counter()
        model.fit(image, nouns, names)
        seconds = time.perf_counter() - start
        res = model.result_
        heads = model.predict_proba(image).argmax(1)
        score = (lambda pred: label_metrics(labels, pred)) if labels is not None \
            else (lambda pred: {"acc": float("nan"), "nmi": float("nan"), "ari": float("nan")})
        if kmeans_row is None:
            kmeans_row = {"setting": setting, "candidate": "k-means", **score(res.kmeans_labels)}
            rows.append(kmeans_row)
        sel = res.selection
        rows.append({"setting": setting, "candidate": f"{method} heads", **score(heads),
                     "seconds": seconds, "Q": res.scores["heads"]["score"]})
        rows.append({"setting": setting, "candidate": f"{method} guarded", **score(res.labels),
                     "kept": res.source, "z": sel["z"], "Q_kmeans": res.scores["kmeans"]["score"],
                     "old_guard": old_guard(image, heads, res.kmeans_labels)})
        print(f"  {setting} / {method}: {seconds:.1f} s, kept {res.source} "
              f"(z {sel['z']:+.1f}: {sel['reason']})", flush=True)
    return rows


def print_table(rows):
    head = (f"| {'setting':<19}| {'candidate':<14}| {'ACC':>6} | {'NMI':>6} | {'ARI':>6} | "
            f"{'kept (z)':<15}| old guard |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        kept = f"{r['kept']} ({r['z']:+.1f})" if "kept" in r else ""
        print(f"| {r['setting']:<19}| {r['candidate']:<14}| {r['acc']:6.3f} | {r['nmi']:6.3f} | "
              f"{r['ari']:6.3f} | {kept:<15}| {r.get('old_guard', ''):<9} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="points per synthetic setting")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma list of {', '.join(SETTINGS)}; 'none' for only --embeddings")
    p.add_argument("--methods", default="seic,tac", help="comma list of seic, tac")
    p.add_argument("--seic-epochs", type=int, default=30, help="30 as in the quality tests")
    p.add_argument("--tac-epochs", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--embeddings", help="Parquet of embeddings (`embedding`, `id`, [`label`])")
    p.add_argument("--vocabulary", help="Parquet of `noun`, `embedding` (with --embeddings)")
    p.add_argument("--labels", help="Parquet of `id`, `label` (optional, with --embeddings)")
    p.add_argument("--clusters", type=int, help="K for --embeddings (default: label count)")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.embeddings and not args.vocabulary:
        p.error("--embeddings needs --vocabulary (noun embeddings of the same CLIP model)")
    print(f"torch {torch.__version__}, device {args.device}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, n={args.n}", flush=True)
    rows = []
    settings = [] if args.settings == "none" else args.settings.split(",")
    for name in settings:
        rows += evaluate(name, *synthetic(name, args.n), args)
    if args.embeddings:
        rows += evaluate(os.path.basename(args.embeddings.rstrip("/")), *from_parquet(args),
                         args)
    print()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
