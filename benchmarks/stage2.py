"""Stage-2 (self-enhanced fine-tuning) throughput: rayclust's step against a per-image baseline.

What it measures, in one process and on the same cached uint8 images (already resized and
centre-cropped, as the decode tasks deliver them):

1. **rayclust step** (`SelfEnhanceStep`): strong view made on the device for the whole batch
   (`StrongAugment`: one affine_grid/grid_sample for crop+flip, batched colour jitter and
   grayscale), forward of the adapted vision tower and the image head (bf16 autocast on CUDA),
   confidence-weighted cross-entropy, backward, AdamW (fused on CUDA).
2. **per-image baseline**: the same model, loss and optimiser, with the strong view made the way
   VLM4Cluster's stage 2 does it: torchvision transforms per image on the host (RandomResizedCrop,
   flip, ColorJitter with p=0.8, grayscale 0.2, on uint8 tensors), then a host-to-device copy.
3. **table refresh** (`predict_uint8`): weak-view inference, the cost of one pseudo-label refresh.

It prints img/s for each, the rayclust/baseline ratio and, for ViT-B-32 on CUDA, the share of
PERFORMANCE.md's derived bound (30,000 img/s at MAMF for ViT-B/32 fine-tuning; target 12,000).
Images start in device memory (`--source device`, "from cached uint8") or in pinned host memory
(`--source pinned`, copied every step as the Ray Data stream would deliver them).

With `--ray`, it also runs the real pipeline (`rayclust run`, stage 2 on `--workers` Ray Train
workers over generated images) and prints the per-worker img/s of the training epochs next to
the in-process step, so the Ray Data + Ray Train overhead shows as a ratio.

Run::

    uv run python benchmarks/stage2.py                        # CPU, rayclust-tiny, quick
    uv run python benchmarks/stage2.py --ray                  # + the real 2-worker pipeline
    python benchmarks/stage2.py --device cuda --model ViT-B-32 --batch 256 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayclust.encoders import load_encoder  # noqa: E402
from rayclust.method.adapters import apply_adapter, count_parameters  # noqa: E402
from rayclust.method.augment import StrongAugment, weak_view  # noqa: E402
from rayclust.method.heads import SEICHeads  # noqa: E402
from rayclust.method.pseudo_labels import weighted_cross_entropy  # noqa: E402
from rayclust.method.self_enhance import (SelfEnhancedModel, SelfEnhanceStep,  # noqa: E402
                                          compile_tower, freeze_text_branch, make_optimizer,
                                          predict_uint8, trainable_parameters)

BOUND_VITB32 = 30_000  # PERFORMANCE.md 1.x: ViT-B/32 fine-tune img/s at MAMF (derived)
TARGET_VITB32 = 12_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device):
    encoder = load_encoder(args.model, None, device=str(device), seed=0)
    visual = encoder.model.visual
    heads = SEICHeads(encoder.embed_dim, args.clusters)
    apply_adapter(visual, args.adapter, rank=args.rank, seed=0)
    freeze_text_branch(heads)
    mean, std = encoder.preprocess.mean, encoder.preprocess.std
    model = SelfEnhancedModel(visual, heads, mean, std).to(device)
    if device.type == "cuda" and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_tower(model.visual)
    return model, mean, std, encoder.preprocess.size


def images(args, size, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, size[0], size[1], 3), dtype=torch.uint8, generator=g)
    if args.source == "device":
        return x.to(device)
    return x.pin_memory() if device.type == "cuda" else x


def time_loop(fn, batches, steps, warmup, device) -> float:
    for i in range(warmup):
        fn(batches[i % len(batches)])
    _sync(device)
    started = time.perf_counter()
    for i in range(steps):
        fn(batches[i % len(batches)])
    _sync(device)
    return time.perf_counter() - started


def rayclust_step(args, device):
    model, mean, std, size = build(args, device)
    optimizer = make_optimizer(trainable_parameters(model), 5e-5)
    step = SelfEnhanceStep(model, optimizer, mean, std, device,
                           augment=StrongAugment(mean, std))
    data = images(args, size, device)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, args.clusters, (args.batch,), device=device)
    weights = torch.ones(args.batch, device=device)
    batches = [data[i:i + args.batch] for i in range(0, args.images - args.batch + 1, args.batch)]
    seconds = time_loop(lambda b: step(b, labels, weights, g), batches, args.steps, args.warmup,
                        device)
    trainable, total = count_parameters(model.visual)
    if args.phases:  # where the step's time goes: the strong view alone, the step without it
        augment = time_loop(lambda b: step.augment(b, g), batches, args.steps, 1, device)
        plain = SelfEnhanceStep(model, optimizer, mean, std, device,
                                augment=lambda u, _g: weak_view(u, mean, std))
        no_aug = time_loop(lambda b: plain(b, labels, weights, g), batches, args.steps, 1, device)
        print(f"  strong view alone                    {args.steps * args.batch / augment:10.1f} img/s")
        print(f"  step with the weak view instead      {args.steps * args.batch / no_aug:10.1f} img/s")
    refresh = time_loop(lambda b: predict_uint8(model, b, mean, std, device.type == "cuda"),
                        batches, args.steps, args.warmup, device)
    return seconds, refresh, trainable, total


def baseline_step(args, device):
    """Per-image torchvision strong views on the host, then the same model/loss/optimiser."""
    from torchvision.transforms import v2

    model, mean, std, size = build(args, device)
    optimizer = make_optimizer(trainable_parameters(model), 5e-5)
    strong = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.32, 0.32, 0.32, 0.08)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
    data = images(args, size, torch.device("cpu"))  # the baseline augments on the host
    labels = torch.randint(0, args.clusters, (args.batch,), device=device)
    weights = torch.ones(args.batch, device=device)
    autocast = device.type == "cuda"

    def step(batch):
        x = torch.stack([strong(img.permute(2, 0, 1)) for img in batch]).to(device,
                                                                           non_blocking=True)
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = weighted_cross_entropy(logits, labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batches = [data[i:i + args.batch] for i in range(0, args.images - args.batch + 1, args.batch)]
    steps = max(1, args.steps // args.baseline_fraction)
    return time_loop(step, batches, steps, min(args.warmup, 1), device), steps


def ray_pipeline(args) -> dict:
    """The real `rayclust run` with stage 2 on generated images; per-worker img/s per epoch."""
    from rayclust import config as cfg
    from rayclust.pipeline.ray_runtime import ensure_ray
    from rayclust.pipeline.run import run
    from rayclust.synthetic import generate_image_folder

    root = tempfile.mkdtemp(prefix="rayclust-bench-stage2-")
    classes = ("circle", "square", "stripes", "checkerboard")
    generate_image_folder(os.path.join(root, "images"), classes,
                          per_class=args.ray_images // len(classes), size=96, seed=0)
    config = cfg.load(None, [
        f"input.path={os.path.join(root, 'images')}", "clusters=4", f"model.name={args.model}",
        "model.pretrained=none", "vocabulary.max_nouns=200", "seic.epochs=2",
        "seic.candidate_nouns_per_centre=20", "seic.nouns_per_image=10", "guard.enabled=false",
        "stage2.enabled=true", f"stage2.epochs={args.ray_epochs}",
        f"stage2.batch_size={args.ray_batch}", f"stage2.lora_rank={args.rank}",
        f"train.workers={args.workers}", "progress=false", f"ray.num_cpus={args.ray_cpus}"])
    ensure_ray(config)
    started = time.perf_counter()
    outputs = run(config, os.path.join(root, "run"))
    history = outputs["metrics_values"]["stage2"]["history"]
    return {"seconds_total": time.perf_counter() - started, "history": history,
            "images": outputs["metrics_values"]["images"], "run_dir": os.path.join(root, "run")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="rayclust-tiny")
    p.add_argument("--adapter", default="lora", choices=("lora", "last_blocks", "full", "none"))
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline-fraction", type=int, default=1,
                   help="run the (slow) baseline for steps/this many steps")
    p.add_argument("--source", default="device", choices=("device", "pinned"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the vision tower")
    p.add_argument("--phases", action="store_true",
                   help="also time the strong view alone and the step without it")
    p.add_argument("--ray", action="store_true", help="also time the real 2-worker pipeline")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray-images", type=int, default=256)
    p.add_argument("--ray-epochs", type=int, default=2)
    p.add_argument("--ray-batch", type=int, default=32)
    p.add_argument("--ray-cpus", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"model {args.model} (random weights), adapter {args.adapter} rank {args.rank}, batch "
          f"{args.batch}, {args.steps} timed steps after {args.warmup} warm-up, images from "
          f"{args.source} memory")
    out: dict = {"device": str(device), "model": args.model, "batch": args.batch}
    seconds, refresh, trainable, total = rayclust_step(args, device)
    ours = args.steps * args.batch / seconds
    out.update(rayclust_img_s=ours, refresh_img_s=args.steps * args.batch / refresh,
               trainable=trainable, total=total)
    print(f"trainable parameters in the tower: {trainable:,} of {total:,}")
    print(f"rayclust step (on-device strong view)  {ours:10.1f} img/s  ({seconds / args.steps * 1e3:.1f} ms/step)")
    print(f"table refresh (weak-view inference)    {out['refresh_img_s']:10.1f} img/s")
    if not args.no_baseline:
        base_seconds, base_steps = baseline_step(args, device)
        base = base_steps * args.batch / base_seconds
        out.update(baseline_img_s=base, ratio=ours / base)
        print(f"per-image host augmentation baseline   {base:10.1f} img/s  ({base_seconds / base_steps * 1e3:.1f} ms/step)")
        print(f"ratio rayclust / baseline              {ours / base:10.2f}x")
    if args.model == "ViT-B-32" and device.type == "cuda":
        print(f"share of the ViT-B/32 bound ({BOUND_VITB32:,} img/s at MAMF): {ours / BOUND_VITB32:.1%}; "
              f"target {TARGET_VITB32:,} img/s -> {ours / TARGET_VITB32:.2f}x of target")
        out["share_of_bound"] = ours / BOUND_VITB32
    if args.ray:
        r = ray_pipeline(args)
        rates = [h["images_per_second_per_worker"] for h in r["history"]]
        print(f"Ray pipeline: {r['images']} images, {args.workers} workers, batch {args.ray_batch}, "
              f"{args.ray_epochs} epochs, whole run {r['seconds_total']:.1f} s")
        for h in r["history"]:
            print(f"  epoch {h['epoch'] + 1}: {h['images_per_second_per_worker']:.1f} img/s per worker "
                  f"({h['steps']} steps, {h['seconds']:.1f} s)")
        print(f"  best epoch / in-process step (batch {args.batch}): {max(rates) / ours:.2f}")
        out["ray"] = {"per_worker_img_s": rates, "seconds_total": r["seconds_total"]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
