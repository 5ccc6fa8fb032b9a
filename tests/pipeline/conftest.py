import os

import pytest
from PIL import Image

from rayclust import config as cfg
from rayclust.synthetic import generate_image_folder

CLASSES = ("circle", "square", "stripes")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """9 generated images per class in class folders, two broken files and two odd good ones."""
    root = str(tmp_path_factory.mktemp("images"))
    generate_image_folder(root, CLASSES, per_class=9, size=72, seed=3)
    with open(os.path.join(root, "circle", "corrupt.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    open(os.path.join(root, "square", "empty.png"), "wb").close()
    Image.new("RGBA", (40, 90), (10, 200, 30, 128)).save(os.path.join(root, "stripes", "x.png"))
    # the format comes from the content: a PNG named .jpg is a good image
    Image.new("L", (50, 50), 90).save(os.path.join(root, "square", "misnamed.jpg"), format="PNG")
    return root


def tiny_config(tmp_path, image_folder=None, **overrides) -> cfg.Config:
    settings = [
        "clusters=3", "model.name=rayclust-tiny", "model.pretrained=none", "model.batch_size=8",
        "vocabulary.max_nouns=300", f"vocabulary.cache_dir={tmp_path}/vocab-cache",
        "seic.epochs=3", "seic.batch_size=16", "seic.candidate_nouns_per_centre=50",
        "seic.nouns_per_image=10", "tac.epochs=2", "tac.batch_size=16", "tac.knn=5",
        "output.rows_per_file=10", "progress=false", "input.labels=from_folder",
        "guard.neighbours=5",
    ]
    if image_folder:
        settings.append(f"input.path={image_folder}")
    settings += [f"{k}={v}" for k, v in overrides.items()]
    return cfg.load(None, settings)
