"""Command line: `rayclust run CONFIG`, `rayclust embed`, `rayclust cluster-embeddings`,
`rayclust stage NAME`, `rayclust demo`, `rayclust config`. Thin: parse, load the config, call one pipeline entry function.

User mistakes (bad config, missing input, weights that cannot be downloaded) print one clear
`rayclust: error: ...` line and exit with status 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rayclust import config as cfg
from rayclust import storage
from rayclust.method import registry
from rayclust.pipeline import demo as demo_mod
from rayclust.pipeline import run as run_mod
from rayclust.storage import StorageError

EPILOG = """Every option of the config can be overridden with --set KEY=VALUE (repeatable), e.g.
  --set clusters=20 --set model.pretrained=none --set storage.endpoint=http://127.0.0.1:9000
`rayclust config` prints every key with its default and meaning."""


def _common(parser: argparse.ArgumentParser, run_dir_default: str) -> None:
    parser.add_argument("--run-dir", default=None,
                        help="Run directory, a local path or s3:// URI; everything the run writes "
                             f"goes there and re-running the same command resumes it "
                             f"(default: {run_dir_default}).")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="Override one config value (dotted key, YAML value); repeatable.")
    parser.add_argument("--no-progress", action="store_true",
                        help="No progress bars: plain periodic log lines (for logs and CI).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayclust", description="Language-assisted image clustering on CLIP ("
        + ", ".join(m.name.upper() for m in registry.METHODS) + ").",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="Cluster a folder, s3:// prefix or manifest of images.",
                       description="Embed the images named by input.path, embed the "
                                   "vocabulary, train stage 1 and write assignments, "
                                   "clusters.parquet and metrics.json to the run directory.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/).")
    _common(p, "runs/<config name>")

    p = sub.add_parser("embed", help="Only embed images (manifest, embeddings, errors, "
                                     "thumbnails).",
                       description="List the input once into a sharded manifest and embed every "
                                   "image on Ray Data (CPU decode tasks, encoder actor pool); "
                                   "re-running finishes missing shards.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="PATH_OR_URI",
                   help="Folder, s3:// prefix, or Parquet/CSV manifest with a `uri` column.")
    p.add_argument("--config", metavar="CONFIG", help="Optional YAML config file.")
    _common(p, "runs/<input name>")

    p = sub.add_parser("cluster-embeddings", help="Cluster precomputed CLIP embeddings.",
                       description="Cluster a Parquet of precomputed embeddings (an `embedding` "
                                   "column as fixed_size_list or list<float>, optional id, uri, "
                                   "label) without reading any image.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, metavar="PATH",
                   help="Parquet file or folder of embeddings (local or s3://).")
    p.add_argument("--vocabulary", metavar="PATH",
                   help="Parquet of (noun, embedding) from the same CLIP model; without it the "
                        "nouns are encoded with model.name/model.pretrained.")
    p.add_argument("--config", metavar="CONFIG", help="Optional YAML config file.")
    _common(p, "runs/<embeddings file name>")

    p = sub.add_parser("demo", help="Generate a small labelled image set and cluster it.",
                       description="Generate 300 images of 6 visually distinct classes, run the "
                                   "whole pipeline locally and print the metrics. The default "
                                   "model is open_clip ViT-B-32 (laion2b_s34b_b79k, ~605 MB "
                                   "download on first use); offline, add "
                                   "--set model.pretrained=none (random weights).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="CONFIG", help="Optional YAML config file.")
    p.add_argument("--images-dir", metavar="DIR",
                   help="Where the generated images go (default: demo-images beside the run "
                        "directory).")
    _common(p, "runs/demo")

    STAGE_NAMES = run_mod.STAGE_NAMES
    p = sub.add_parser("stage", help="Run one stage on an existing run directory.",
                       description="Run one stage (" + ", ".join(STAGE_NAMES) + ") on a run "
                                   "directory, with the config.yaml it holds (--set overrides "
                                   "are written back to it). The stage reads its inputs from the "
                                   "run directory only; one whose inputs are missing names the "
                                   "stage to run first. A complete stage is skipped.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=STAGE_NAMES, metavar="NAME",
                   help="One of: " + ", ".join(STAGE_NAMES) + ".")
    p.add_argument("--run-dir", required=True,
                   help="The run directory (local path or s3:// URI; for S3 give "
                        "--set storage.endpoint=... when not AWS).")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="Override one config value (dotted key, YAML value); repeatable.")
    p.add_argument("--no-progress", action="store_true",
                   help="No progress bars: plain periodic log lines (for logs and CI).")

    p = sub.add_parser("config", help="Print the resolved config, or every key documented.",
                       description="Without --describe, print the config (defaults, file, "
                                   "overrides) as YAML; with --describe, a table of every key.")
    p.add_argument("config", nargs="?", help="Optional YAML config file.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one config value; repeatable.")
    p.add_argument("--describe", action="store_true", help="Document every key.")
    return parser


def _stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    return name.split(".")[0] or "run"


def _load(path: str | None, overrides: list[str], no_progress: bool, base: dict | None = None):
    if no_progress:
        overrides = [*overrides, "progress=false"]
    return cfg.load(path, overrides, base=base)


def _print_summary(outputs: dict, options) -> None:
    metrics = outputs["metrics_values"]
    lines = [f"rayclust: {metrics['images']} images -> {metrics['clusters']} clusters "
             f"({metrics['method']}, assignments from {metrics['assignment_source']})"]
    if "labels" in metrics:
        m = metrics["labels"]
        lines.append(f"  ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}")
        if "kmeans_baseline_labels" in metrics:
            b = metrics["kmeans_baseline_labels"]
            lines.append(f"  k-means baseline: ACC {b['acc']:.4f}  NMI {b['nmi']:.4f}  "
                         f"ARI {b['ari']:.4f}")
    lf = metrics.get("label_free", {})
    if lf:
        lines.append(f"  label-free: neighbour agreement {lf['neighbour_agreement']:.4f}, "
                     f"normalised size entropy {lf['size_entropy_normalized']:.4f}")
    if metrics.get("errors"):
        lines.append(f"  {metrics['errors']} input(s) skipped: see {outputs['run_dir']}/errors/")
    lines.append(f"  outputs in {outputs['run_dir']}: assignments/, clusters.parquet, "
                 "metrics.json, config.yaml")
    print("\n".join(lines))
    try:
        table = storage.read_parquet(outputs["clusters"], options)
        for row in table.to_pylist():
            extra = (f"  purity {row['purity']:.2f} ({row['majority_label']})"
                     if row.get("purity") is not None else "")
            print(f"  cluster {row['cluster']:>3}  {row['size']:>7}  {row['name']!s:<24}"
                  f"{', '.join(row['top_nouns'][1:4])}{extra}")
    except Exception:  # the summary table is a courtesy; the files are the output
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; libraries (open_clip logs model construction at INFO) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("rayclust").setLevel(logging.INFO)

    try:
        if args.command == "config":
            if args.describe:
                for key, default, doc in cfg.describe_fields():
                    print(f"{key:<42} {default:<22} {doc}")
                return 0
            print(cfg.to_yaml(cfg.load(args.config, args.overrides)), end="")
            return 0
        if args.command == "run":
            config = _load(args.config, args.overrides, args.no_progress)
            outputs = run_mod.run(config, args.run_dir or os.path.join("runs", _stem(args.config)))
        elif args.command == "embed":
            config = _load(args.config, [f"input.path={args.input}", *args.overrides],
                           args.no_progress)
            out = run_mod.embed(config, args.run_dir or os.path.join("runs", _stem(args.input)))
            print(f"rayclust: {out['images']} images embedded, {out['errors']} skipped "
                  f"(see errors/); outputs in {out['run_dir']}")
            return 0
        elif args.command == "stage":
            overrides = [*args.overrides, *(["progress=false"] if args.no_progress else [])]
            # storage.* from the command line reach a run directory on S3
            options = cfg.load(None, [o for o in overrides if o.startswith("storage.")]).storage
            out = run_mod.stage(args.name, args.run_dir, overrides, options)
            if args.name == "assign":
                _print_summary(out, options)
            else:
                verb = "ran" if out["stages"][args.name] == "ran" else "was complete already"
                print(f"rayclust: stage {args.name} {verb}; outputs in {out['run_dir']}")
            return 0
        elif args.command == "cluster-embeddings":
            config = _load(args.config, args.overrides, args.no_progress)
            outputs = run_mod.cluster_embeddings(
                config, args.run_dir or os.path.join("runs", _stem(args.embeddings)),
                args.embeddings, args.vocabulary)
        else:
            config = _load(args.config, args.overrides, args.no_progress,
                           base=demo_mod.DEMO_SETTINGS)
            outputs = demo_mod.demo(config, args.run_dir or os.path.join("runs", "demo"),
                                    args.images_dir)
        _print_summary(outputs, config.storage)
        return 0
    except _user_errors() as exc:  # evaluated when an exception arrives, after the imports
        print(f"rayclust: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayclust: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        _stop_ray()


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's mistake. `EncoderLoadError` is named only once its
    module is loaded: importing it here would import torch and open_clip (many seconds) before
    a wrong input file or config key could be reported."""
    errors: list[type[BaseException]] = [cfg.ConfigError, StorageError, FileNotFoundError]
    encoders = sys.modules.get("rayclust.encoders")
    if encoders is not None:
        errors.append(encoders.EncoderLoadError)
    return tuple(errors)


def _stop_ray() -> None:
    """Stop the local Ray cluster this command started (or leave the one it joined) before
    returning, so the process exits as soon as the command is done, after an error too."""
    runtime = sys.modules.get("rayclust.pipeline.ray_runtime")  # imported only if Ray was used
    if runtime is not None:
        runtime.shutdown_if_connected_here()


if __name__ == "__main__":
    sys.exit(main())
