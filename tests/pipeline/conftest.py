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


# Every format and colour mode the embed stage must handle, each a good image (issue: "every
# image format and every broken file"); the file names say what each one exercises.
def _odd_images(folder: str) -> list[str]:
    import numpy as np
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    cases = {
        "rgb.webp": (rgb, "WEBP"), "rgb.bmp": (rgb, "BMP"), "rgb.tiff": (rgb, "TIFF"),
        "palette.gif": (rgb.convert("P"), "GIF"), "rgba.png": (rgb.convert("RGBA"), "PNG"),
        "cmyk.jpg": (rgb.convert("CMYK"), "JPEG"), "gray.png": (rgb.convert("L"), "PNG"),
        "gray16.png": (Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)),
                       "PNG"),
        "tiny.png": (Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "elongated.png": (Image.new("RGB", (2000, 3), (0, 0, 255)), "PNG"),
    }
    for name, (image, fmt) in cases.items():
        image.save(os.path.join(folder, name), format=fmt)
    rgb.convert("P").save(os.path.join(folder, "palette_alpha.png"), transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(os.path.join(folder, "rotated_exif.jpg"), exif=exif.tobytes())
    with open(os.path.join(folder, "truncated.jpg"), "wb") as handle:
        buffer = __import__("io").BytesIO()
        rgb.save(buffer, format="JPEG")
        handle.write(buffer.getvalue()[:300])
    with open(os.path.join(folder, "text.png"), "w") as handle:
        handle.write("not an image at all")
    return sorted(os.listdir(folder))


@pytest.fixture(scope="session")
def odd_image_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("odd"))
    _odd_images(os.path.join(root, "odd"))
    return root


VOCAB_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rayclust-tests", "vocabulary")


def tiny_config(tmp_path, image_folder=None, **overrides) -> cfg.Config:
    settings = [
        "clusters=3", "model.name=rayclust-tiny", "model.pretrained=none", "model.batch_size=8",
        "vocabulary.max_nouns=300", f"vocabulary.cache_dir={VOCAB_CACHE}",
        "seic.epochs=3", "seic.batch_size=16", "seic.candidate_nouns_per_centre=50",
        "seic.nouns_per_image=10", "tac.epochs=2", "tac.batch_size=16", "tac.knn=5",
        "output.rows_per_file=10", "input.rows_per_shard=10", "progress=false", "input.labels=from_folder",
        "guard.neighbours=5",
    ]
    if image_folder:
        settings.append(f"input.path={image_folder}")
    settings += [f"{k}={v}" for k, v in overrides.items()]
    return cfg.load(None, settings)


@pytest.fixture(scope="session")
def finished_run(image_folder, tmp_path_factory):
    """One complete local run (stage 1 in the driver) on the generated images."""
    from rayclust.pipeline.run import run

    tmp = tmp_path_factory.mktemp("run")
    config = tiny_config(tmp, image_folder)
    outputs = run(config, str(tmp / "run"))
    return config, str(tmp / "run"), outputs
