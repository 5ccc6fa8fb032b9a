"""Embedding throughput: rayclust's Ray Data stage against a plain single-process PyTorch loop.

What it measures
----------------
On N generated JPEGs (default 2,000 at 500x375, smooth random content plus grain, quality 90,
cached on disk and reused), with the same open_clip model (default ViT-B-32, random weights: the
same arithmetic as pretrained ones) and the same preprocessing (``decode_image`` ->
``ImagePreprocess.to_uint8`` -> ``ClipEncoder.encode_uint8``):

1. **plain loop**: one process, for each batch of ``--batch-size`` files: read the bytes
   (``storage.read_bytes``), ``decode_image``, ``preprocess.to_uint8``, ``encode_uint8``. The
   model is loaded before the clock starts (its load time is printed on its own line) and one
   untimed full-batch forward warms it up. The decode and encode parts of the loop are also timed
   separately (ms/image). After it, the Ray stage's own decode UDF (``decode_batch``: decode,
   to_uint8 and the 96 px thumbnail JPEG) is timed in this process, which is what one Ray decode
   task does for a whole manifest shard.
2. **Ray Data**: ``rayclust.pipeline.run.embed(config, fresh_run_dir)`` with the same model, in a
   local Ray cluster the script starts (``ray.init(num_cpus=os.cpu_count())``, timed on its own
   line). It is run three times in the same Ray session (``--ray-runs`` on the N images, then
   once on N/4), each time into a fresh run directory:

   * *end to end*: from the call to its return: manifest listing, the model load in a describe
     task (first run only; cached afterwards), encoder actor start and model load, decode tasks
     (including the 96 px thumbnail JPEG of every image, which the plain loop does not make),
     encoding, Parquet writes of embeddings, errors and thumbnails, and the run's final
     completion markers;
   * *marginal (steady state)*: a third run on the first N/4 images (``--marginal-n``), also in
     the warm session; (N - N/4) / (T_N - T_N/4) with T_N the second run's time. The fixed costs
     that both warm runs pay (manifest, actor start, model load, Ray task start-up) cancel, so
     this is the rate at which the pipeline moves images once it is going.
   * the line of each run also says how many blocks of rows reached the driver and when the
     first arrived (from wrapping ``rayclust.pipeline.embed._ShardWriter.add`` in this process,
     the driver; nothing else is changed). With a manifest that Ray reads as one block (any
     corpus up to 50,000 images with the default shards) the rows arrive in a few bursts late in
     the run, so a rate "after the first block" says nothing about the steady state; the JSON
     keeps it (``steady_*``) for larger corpora.

   The second run's end-to-end figure includes less warm-up (Ray workers already started, the
   model description cached) but still starts a new actor pool and loads the model in it.

It prints images/s of each, the ratio Ray/plain, and checks that both computed the same
embeddings (max |difference| over the images both saw).

GPU modes (need neither Ray nor a Ray cluster; ``import ray`` only happens in the Ray branch):

* ``--uint8-only``: ``encode_uint8`` images/s on pre-decoded uint8 batches of ``--gpu-batch``
  (default 1024) under rayclust's bf16 autocast, for four inputs: a pageable host numpy array
  (what a Ray Data actor receives), a pinned host tensor (copied to the device each batch,
  non_blocking), a uint8 tensor already on the device, and, as the model's own ceiling in this
  setting, ``model.encode_image`` on an already normalised float tensor on the device (plus a
  bf16-weights variant without autocast). Each is reported against the PERFORMANCE.md compute
  bound (ViT-B/32: 8.82 GFLOPs/image, 90,079 images/s on one H100 at its measured MAMF).
* ``--dataloader``: JPEG bytes -> embeddings without Ray: a ``torch.utils.data.DataLoader`` with
  ``--workers`` processes doing read + decode + to_uint8 (pinned, prefetched batches), encoding
  in the main process; and the same DataLoader with no encoding (the CPU decode bound).
  ``--passes`` repeats the file list to lengthen the run.

If either GPU flag is given only those measurements run, plus the plain loop with ``--plain``.

Run::

    uv run python benchmarks/embed.py --quick             # n=200, rayclust-tiny, ~1.5 min
    uv run python benchmarks/embed.py --n 300             # ViT-B-32 on CPU, both paths
    uv run python benchmarks/embed.py --skip-ray          # the plain loop only
    python benchmarks/embed.py --device cuda --uint8-only --dataloader --workers 16 \\
        --loader-batch 256 --passes 4 --plain --json embed_gpu.json   # one GPU, no Ray needed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

# PERFORMANCE.md: ViT-B/32 forward at 224 px, and the H100 bound at its measured MAMF
VIT_B32_GFLOPS = 8.82
H100_BOUND_IMG_S = 90_079

QUICK = {"n": 200, "model": "rayclust-tiny"}


# ---------------------------------------------------------------------------------------------
# Generated JPEGs


def _make_jpeg(job: tuple[str, int, int, int, int]) -> int:
    """One deterministic image: a smooth random colour field plus grain, saved as JPEG."""
    from PIL import Image

    path, index, width, height, quality = job
    if os.path.exists(path):
        return os.path.getsize(path)
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(4, 12)), 3),
                          dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                      Image.Resampling.BICUBIC), np.float32)
    pixels = np.clip(field + rng.normal(0.0, 6.0, field.shape), 0, 255).astype(np.uint8)
    tmp = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(pixels).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)
    return os.path.getsize(path)


def generate_jpegs(folder: str, n: int, width: int, height: int, quality: int = 90,
                   processes: int | None = None) -> tuple[list[str], float, int]:
    """img_000000.jpg ... in `folder` (existing files are reused); (paths, seconds, bytes)."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"img_{i:06d}.jpg") for i in range(n)]
    jobs = [(p, i, width, height, quality) for i, p in enumerate(paths)]
    started = time.perf_counter()
    missing = [j for j in jobs if not os.path.exists(j[0])]
    if missing:
        import multiprocessing as mp
        processes = min(processes or os.cpu_count() or 1, len(missing))
        if processes > 1:
            with mp.get_context("fork").Pool(processes) as pool:
                pool.map(_make_jpeg, missing, chunksize=16)
        else:
            for job in missing:
                _make_jpeg(job)
    total = sum(os.path.getsize(p) for p in paths)
    return paths, time.perf_counter() - started, total


# ---------------------------------------------------------------------------------------------
# Helpers


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(args):
    from rayclust.encoders import load_encoder
    started = time.perf_counter()
    encoder = load_encoder(args.model, args.pretrained, device=args.device, seed=args.seed)
    _sync(encoder.device)
    return encoder, time.perf_counter() - started


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def _line(label: str, n: int, seconds: float, extra: str = "") -> None:
    print(f"  {label:<44} {n:>7d} img  {seconds:9.2f} s  {_rate(n, seconds):10.1f} img/s"
          + (f"  {extra}" if extra else ""), flush=True)


def _bound(rate: float, model: str) -> str:
    if model.replace("/", "-") != "ViT-B-32":
        return ""
    tflops = rate * VIT_B32_GFLOPS / 1e3
    return f"{tflops:6.1f} TFLOP/s, {100 * rate / H100_BOUND_IMG_S:5.1f}% of the H100 bound"


# ---------------------------------------------------------------------------------------------
# 1. The plain single-process loop


def plain_loop(args, paths: list[str], encoder) -> tuple[dict, dict[str, np.ndarray]]:
    """read bytes -> decode_image -> to_uint8 -> encode_uint8, batch by batch, one process."""
    from rayclust import storage
    from rayclust.images import decode_image
    from rayclust.storage import StorageOptions

    options = StorageOptions()
    pre = encoder.preprocess
    h, w = pre.size
    warm = np.zeros((min(args.batch_size, len(paths)), h, w, 3), np.uint8)
    encoder.encode_uint8(warm)  # untimed, full batch: first-call allocations, kernel selection
    _sync(encoder.device)
    vectors: dict[str, np.ndarray] = {}
    decode_s = encode_s = 0.0
    started = time.perf_counter()
    for s in range(0, len(paths), args.batch_size):
        chunk = paths[s:s + args.batch_size]
        t0 = time.perf_counter()
        pixels = np.stack([pre.to_uint8(decode_image(storage.read_bytes(p, options)))
                           for p in chunk])
        t1 = time.perf_counter()
        out = encoder.encode_uint8(pixels).numpy()  # float32 CPU: synchronises
        t2 = time.perf_counter()
        decode_s += t1 - t0
        encode_s += t2 - t1
        vectors.update(zip(chunk, out))
    seconds = time.perf_counter() - started
    n = len(paths)
    return ({"images": n, "seconds": seconds, "images_per_s": _rate(n, seconds),
             "decode_ms_per_image": 1e3 * decode_s / n,
             "encode_ms_per_image": 1e3 * encode_s / n}, vectors)


# ---------------------------------------------------------------------------------------------
# 2. The Ray Data stage


def ray_pipeline(args, folder: str, n: int, work_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    import ray  # only here: the GPU modes run where Ray is not installed

    from rayclust import config as config_module
    from rayclust import storage
    from rayclust.pipeline import embed as embed_module
    from rayclust.pipeline.run import embed

    overrides = [f"input.path={folder}", f"input.max_images={n}",
                 f"model.name={args.model}", f"model.pretrained={args.pretrained}",
                 f"model.device={args.device}", f"model.batch_size={args.batch_size}",
                 f"embed.decode_batch_size={args.decode_batch_size}",
                 f"ray.num_cpus={os.cpu_count()}", f"seed={args.seed}", "progress=false"]
    if args.actors:
        overrides.append(f"embed.actors={args.actors}")
    if args.rows_per_shard:
        overrides.append(f"input.rows_per_shard={args.rows_per_shard}")
    if args.no_thumbnails:
        overrides.append("embed.thumbnail_size=0")
    config = config_module.load(None, overrides)

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
             logging_level="WARNING")
    init_s = time.perf_counter() - started
    print(f"  ray.init: {init_s:.2f} s (Ray {ray.__version__}, "
          f"{ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs)", flush=True)

    @ray.remote(num_cpus=config.embed.cpus_per_actor)
    def threads_in_a_worker() -> tuple[int, str | None]:
        import torch
        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    threads, omp = ray.get(threads_in_a_worker.remote())
    print(f"  torch threads in a Ray worker with num_cpus={config.embed.cpus_per_actor:g}: "
          f"{threads} (OMP_NUM_THREADS={omp}); in this process: "
          f"{__import__('torch').get_num_threads()}", flush=True)

    arrivals: list[tuple[float, int]] = []
    original_add = embed_module._ShardWriter.add

    def timed_add(self, table):
        arrivals.append((time.perf_counter(), table.num_rows))
        return original_add(self, table)

    embed_module._ShardWriter.add = timed_add
    runs, vectors = [], {}
    sizes = [n] * args.ray_runs + ([args.marginal_n] if args.marginal_n else [])
    try:
        for attempt, size in enumerate(sizes):
            run_dir = tempfile.mkdtemp(prefix=f"ray-run{attempt + 1}-", dir=work_dir)
            config.input.max_images = size
            arrivals.clear()
            t0 = time.perf_counter()
            result = embed(config, run_dir)
            seconds = time.perf_counter() - t0
            first_t, first_rows = arrivals[0]
            last_t = arrivals[-1][0]
            rest = sum(r for _, r in arrivals[1:])
            steady = _rate(rest, last_t - first_t) if len(arrivals) > 1 else float("nan")
            runs.append({"images": result["images"], "errors": result["errors"],
                         "seconds": seconds, "images_per_s": _rate(result["images"], seconds),
                         "first_batch_after_s": first_t - t0, "batches": len(arrivals),
                         "steady_images": rest, "steady_seconds": last_t - first_t,
                         "steady_images_per_s": steady, "after_last_batch_s": t0 + seconds - last_t})
            if attempt == 0:
                for part in result["embeddings"]:
                    table = storage.read_parquet(part, None, ["uri", "embedding"])
                    emb = np.asarray(table["embedding"].combine_chunks().flatten(), np.float32)
                    emb = emb.reshape(table.num_rows, -1)
                    vectors.update(zip(table["uri"].to_pylist(), emb))
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        embed_module._ShardWriter.add = original_add
        ray.shutdown()
    out = {"ray_init_s": init_s, "worker_torch_threads": threads, "runs": runs,
           "config": overrides}
    if args.marginal_n and args.ray_runs >= 2:
        full, small = runs[args.ray_runs - 1], runs[-1]
        images = full["images"] - small["images"]
        seconds = full["seconds"] - small["seconds"]
        out["marginal"] = {"images": images, "seconds": seconds,
                           "images_per_s": _rate(images, seconds),
                           "from_runs": [args.ray_runs, len(runs)]}
    return out, vectors


# ---------------------------------------------------------------------------------------------
# 3. GPU: pre-decoded uint8, and a DataLoader end to end


def uint8_only(args, encoder) -> dict:
    import torch

    dev = encoder.device
    h, w = encoder.preprocess.size
    b = args.gpu_batch
    gen = torch.Generator().manual_seed(args.seed)
    host = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=gen)
    pinned = host.pin_memory() if dev.type == "cuda" else host
    on_device = host.to(dev)
    pageable = host.numpy().copy()

    def timed(fn, label: str) -> dict:
        for _ in range(args.warmup):
            fn()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        _sync(dev)
        seconds = time.perf_counter() - t0
        n = b * args.iters
        _line(label, n, seconds, _bound(_rate(n, seconds), args.model))
        return {"images": n, "seconds": seconds, "images_per_s": _rate(n, seconds)}

    print(f"\nPre-decoded uint8 ({b} x {h}x{w}x3 per batch, {args.iters} timed batches after "
          f"{args.warmup} warm-up, device {dev}):", flush=True)
    out = {"batch": b}
    out["encode_uint8_host_pageable"] = timed(lambda: encoder.encode_uint8(pageable),
                                              "encode_uint8, pageable numpy (Ray actor)")
    out["encode_uint8_host_pinned"] = timed(lambda: encoder.encode_uint8(pinned),
                                            "encode_uint8, pinned host tensor")
    out["encode_uint8_on_device"] = timed(lambda: encoder.encode_uint8(on_device),
                                          "encode_uint8, uint8 already on device")
    mean = torch.tensor(encoder.preprocess.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(encoder.preprocess.std, device=dev).view(1, 3, 1, 1)
    x = (on_device.permute(0, 3, 1, 2).float().div(255) - mean) / std
    model = encoder.model

    def forward_autocast():
        with torch.no_grad(), encoder._autocast():
            return model.encode_image(x)

    out["model_only_autocast"] = timed(forward_autocast, "model.encode_image only, autocast")
    if dev.type == "cuda":
        import copy
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
        xb = x.to(torch.bfloat16)

        def forward_bf16():
            with torch.no_grad():
                return model_bf16.visual(xb)

        out["model_only_bf16_weights"] = timed(forward_bf16, "model.visual only, bf16 weights")
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)  # fp32
            amp = encoder.encode_uint8(on_device).to(dev)
            low = torch.nn.functional.normalize(forward_bf16().float(), dim=-1)
        cos_amp = (ref * amp).sum(-1)
        cos_low = (ref * low).sum(-1)
        print(f"  cosine to the fp32 embedding: autocast min {cos_amp.min().item():.5f} mean "
              f"{cos_amp.mean().item():.5f}; bf16 weights min {cos_low.min().item():.5f} mean "
              f"{cos_low.mean().item():.5f}", flush=True)
        out["cosine_to_fp32"] = {"autocast_min": cos_amp.min().item(),
                                 "autocast_mean": cos_amp.mean().item(),
                                 "bf16_weights_min": cos_low.min().item(),
                                 "bf16_weights_mean": cos_low.mean().item()}
        del model_bf16, xb
    del x, on_device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


class JpegDataset:
    """torch Dataset (duck-typed): path -> read -> decode_image -> to_uint8, in a worker."""

    def __init__(self, paths: list[str], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from rayclust.images import decode_image
        with open(self.paths[i], "rb") as f:
            return self.preprocess.to_uint8(decode_image(f.read()))


def dataloader_loop(args, paths: list[str], encoder) -> dict:
    from torch.utils.data import DataLoader

    dev = encoder.device
    files = paths * args.passes
    dataset = JpegDataset(files, encoder.preprocess)
    b = args.loader_batch or args.batch_size

    def loader():
        return DataLoader(dataset, batch_size=b, shuffle=False, num_workers=args.workers,
                          pin_memory=dev.type == "cuda",
                          prefetch_factor=4 if args.workers else None,
                          persistent_workers=False)

    print(f"\nDataLoader, JPEG -> embedding without Ray ({len(paths)} files x {args.passes} "
          f"pass(es), batch {b}, {args.workers} workers, encode in the main process on {dev}); "
          "times include worker start:", flush=True)
    out = {"workers": args.workers, "batch": b, "passes": args.passes}
    def run(label: str, key: str, encode: bool) -> None:
        t0 = time.perf_counter()
        n, first = 0, None
        for batch in loader():
            if encode:
                encoder.encode_uint8(batch)  # returns float32 CPU: synchronises
            n += batch.shape[0]
            if first is None:
                first = (time.perf_counter(), n)
        seconds = time.perf_counter() - t0
        rate = _rate(n, seconds)
        _line(label, n, seconds, _bound(rate, args.model) if encode else "")
        later_n, later_s = n - first[1], t0 + seconds - first[0]
        _line("  the same, after the first batch", later_n, later_s,
              _bound(_rate(later_n, later_s), args.model) if encode else "")
        out[key] = {"images": n, "seconds": seconds, "images_per_s": rate,
                    "first_batch_after_s": first[0] - t0,
                    "after_first_batch_images_per_s": _rate(later_n, later_s)}

    run("decode only (read+decode+to_uint8+collate)", "decode_only", False)
    run("end to end (decode in workers + encode)", "end_to_end", True)
    return out


def decode_udf(args, paths: list[str], preprocess) -> dict:
    """The Ray stage's decode UDF, ``decode_batch``, called in this process (no Ray involved).

    With one manifest shard a single Ray task runs it over every row of the shard, so its rate
    in one process bounds the pipeline's decode rate for a one-shard corpus.
    """
    from rayclust.pipeline.embed import decode_batch
    from rayclust.storage import StorageOptions

    options = StorageOptions()
    t0 = time.perf_counter()
    for s in range(0, len(paths), args.decode_batch_size):
        chunk = paths[s:s + args.decode_batch_size]
        batch = {"uri": np.array(chunk, dtype=object),
                 "path": np.array(["part-00000.parquet"] * len(chunk), dtype=object)}
        decode_batch(batch, options=options, preprocess=preprocess, thumbnail_size=96)
    seconds = time.perf_counter() - t0
    _line("Ray decode UDF (decode_batch + thumbnail)", len(paths), seconds,
          f"{1e3 * seconds / len(paths):.2f} ms/img, one process")
    return {"images": len(paths), "seconds": seconds,
            "images_per_s": _rate(len(paths), seconds)}


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="generated JPEGs (default 2000)")
    p.add_argument("--size", default="500x375", help="JPEG size WxH (default 500x375)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--cache-dir", default=None,
                   help="where the JPEGs are kept (default ~/.cache/rayclust/bench-embed/WxH-qQ)")
    p.add_argument("--work-dir", default=None, help="where Ray run dirs go (default: a temp dir)")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none",
                   help="open_clip tag or 'none' (default; random weights, same compute)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass in the plain loop and model.batch_size for Ray")
    p.add_argument("--actors", type=int, default=None, help="embed.actors (default: rayclust's)")
    p.add_argument("--decode-batch-size", type=int, default=32, help="embed.decode_batch_size")
    p.add_argument("--rows-per-shard", type=int, default=None,
                   help="input.rows_per_shard (default rayclust's 50,000: one shard here)")
    p.add_argument("--no-thumbnails", action="store_true", help="embed.thumbnail_size=0")
    p.add_argument("--ray-runs", type=int, default=2,
                   help="Ray runs in one Ray session, each into a fresh run dir (default 2)")
    p.add_argument("--marginal-n", type=int, default=None,
                   help="images of the extra warm Ray run for the marginal rate (default n//4; "
                        "0 skips it)")
    p.add_argument("--skip-ray", action="store_true", help="plain loop only (no Ray needed)")
    p.add_argument("--keep", action="store_true", help="keep the Ray run directories")
    p.add_argument("--uint8-only", action="store_true",
                   help="measure encode_uint8 on pre-decoded uint8 batches (no JPEGs, no Ray)")
    p.add_argument("--dataloader", action="store_true",
                   help="measure a DataLoader JPEG -> embedding loop (no Ray)")
    p.add_argument("--plain", action="store_true",
                   help="with --uint8-only/--dataloader: also run the plain single-process loop")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="DataLoader workers (default: all CPUs)")
    p.add_argument("--passes", type=int, default=1, help="DataLoader passes over the files")
    p.add_argument("--loader-batch", type=int, default=None,
                   help="DataLoader batch (default --batch-size); a worker builds a whole "
                        "batch, so keep it small enough for all workers to be busy")
    p.add_argument("--gpu-batch", type=int, default=1024, help="batch of --uint8-only")
    p.add_argument("--iters", type=int, default=20, help="timed batches of --uint8-only")
    p.add_argument("--warmup", type=int, default=3, help="warm-up batches of --uint8-only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if p.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    if args.marginal_n is None:
        args.marginal_n = args.n // 4 if args.ray_runs >= 2 else 0
    try:
        args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size {args.size!r}: expected WxH, e.g. 500x375")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu_modes = args.uint8_only or args.dataloader
    cache = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "rayclust",
                                           "bench-embed", f"{args.width}x{args.height}-q{args.quality}")
    report: dict = {}

    paths: list[str] = []
    if not args.uint8_only or args.dataloader or args.plain:
        paths, gen_s, total = generate_jpegs(cache, args.n, args.width, args.height, args.quality)
        print(f"JPEGs: {len(paths)} x {args.width}x{args.height} q{args.quality} in {cache} "
              f"(mean {total / len(paths) / 1024:.1f} KiB; generated/checked in {gen_s:.1f} s)",
              flush=True)
        report["jpegs"] = {"n": len(paths), "folder": cache, "mean_bytes": total / len(paths)}

    import torch  # after the fork-based generation

    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}",
          flush=True)
    report["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                     "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

    encoder, load_s = _load(args)
    print(f"model {args.model} (pretrained={args.pretrained}) on {encoder.device}: loaded in "
          f"{load_s:.2f} s (not in any timed figure), input {encoder.preprocess.size}, "
          f"dim {encoder.embed_dim}", flush=True)
    report["model"] = {"name": args.model, "pretrained": args.pretrained,
                       "device": str(encoder.device), "load_s": load_s}
    if args.loader_batch is None:
        args.loader_batch = args.batch_size

    if gpu_modes:
        if args.uint8_only:
            report["uint8"] = uint8_only(args, encoder)
        if args.dataloader:
            report["dataloader"] = dataloader_loop(args, paths, encoder)
    if not gpu_modes or args.plain:
        print(f"\nPlain single-process loop (batch {args.batch_size}; model loaded and warmed "
              "up before the clock):", flush=True)
        plain, plain_vectors = plain_loop(args, paths, encoder)
        _line("plain loop", plain["images"], plain["seconds"],
              f"decode {plain['decode_ms_per_image']:.2f} ms/img, "
              f"encode {plain['encode_ms_per_image']:.2f} ms/img")
        report["plain"] = plain
        report["decode_udf"] = decode_udf(args, paths, encoder.preprocess)

    if not gpu_modes and not args.skip_ray:
        del encoder
        work_dir = args.work_dir or tempfile.mkdtemp(prefix="rayclust-bench-embed-")
        os.makedirs(work_dir, exist_ok=True)
        print(f"\nRay Data stage, rayclust.pipeline.run.embed (batch {args.batch_size}, decode "
              f"batch {args.decode_batch_size}, {args.ray_runs} run(s) in one Ray session):",
              flush=True)
        ray_report, ray_vectors = ray_pipeline(args, cache, len(paths), work_dir)
        if not args.work_dir and not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        for i, run in enumerate(ray_report["runs"], 1):
            _line(f"run {i}: end to end", run["images"], run["seconds"],
                  f"{run['batches']} block(s) reached the driver, the first after "
                  f"{run['first_batch_after_s']:.2f} s; {run['after_last_batch_s']:.2f} s after "
                  "the last")
        marginal = ray_report.get("marginal")
        if marginal:
            a, b = marginal["from_runs"]
            if marginal["seconds"] > 0:
                _line(f"marginal, runs {a} - {b} (steady state)", marginal["images"],
                      marginal["seconds"])
            else:
                print(f"  marginal, runs {a} - {b}: not measurable, run {a} took "
                      f"{-marginal['seconds']:.2f} s less than run {b} (the fixed costs vary "
                      "more than the work costs; use a larger --n)", flush=True)
        report["ray"] = ray_report
        common = [p for p in paths if p in ray_vectors and p in plain_vectors]
        diff = max((float(np.abs(ray_vectors[p] - plain_vectors[p]).max()) for p in common),
                   default=float("nan"))
        print(f"\n  same embeddings: max |ray - plain| = {diff:.2e} over {len(common)} images",
              flush=True)
        ratios = {}
        for i, run in enumerate(ray_report["runs"][:args.ray_runs], 1):
            ratios[f"run{i}_end_to_end"] = run["images_per_s"] / plain["images_per_s"]
        if marginal and marginal["seconds"] > 0:
            ratios["marginal"] = marginal["images_per_s"] / plain["images_per_s"]
        print("  ratio Ray/plain (images/s): " + ", ".join(f"{k} {v:.2f}x"
                                                            for k, v in ratios.items()), flush=True)
        report["ratio_ray_over_plain"] = ratios
        report["max_abs_diff"] = diff

    report["args"] = {k: v for k, v in vars(args).items()}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
