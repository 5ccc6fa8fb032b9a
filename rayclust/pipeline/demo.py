"""`rayclust demo`: a generated labelled image set, clustered end to end on this machine."""

from __future__ import annotations

import os

from rayclust.config import Config
from rayclust.method import registry
from rayclust.pipeline.progress import log
from rayclust.pipeline.run import check_model, run
from rayclust.synthetic import DEMO_CLASSES, generate_image_folder

# Settings the demo starts from (then the user's --set overrides). The default model is a real
# pretrained CLIP: open_clip ViT-B-32 trained on LAION-2B, a ~605 MB download on first use.
DEMO_SETTINGS = {
    "clusters": len(DEMO_CLASSES),
    "input": {"labels": "from_folder"},
    "model": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "batch_size": 32},
    # 3,000 most frequent WordNet nouns keep the CPU text encoding to a few minutes (cached after
    # the first run); a full run uses all 117,798.
    "vocabulary": {"max_nouns": 3000},
    # each method's settings for a few hundred images, from its registry record
    **{m.name: dict(m.small_data) for m in registry.METHODS},
}
IMAGES_PER_CLASS = 50


def prepare_demo_images(folder: str, seed: int = 0) -> str:
    paths = generate_image_folder(folder, DEMO_CLASSES, IMAGES_PER_CLASS, seed=seed)
    log.info("demo: %d generated images (%d classes: %s) in %s", len(paths), len(DEMO_CLASSES),
             ", ".join(DEMO_CLASSES), folder)
    return folder


def demo(config: Config, run_dir: str, images_dir: str | None = None) -> dict:
    check_model(config)  # a mistyped model fails before 300 images are drawn and Ray starts
    folder = images_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)) or ".",
                                        "demo-images")
    config.input.path = prepare_demo_images(folder, config.seed)
    return run(config, run_dir)
