"""The Ray Data embedding stage: formats, broken files, schemas, thumbnails, kill and resume."""

import io
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
from PIL import Image

from rayclust import storage
from rayclust.pipeline.embed import embed_images
from rayclust.pipeline.faults import DRIVER_FAULT_ENV
from rayclust.pipeline.run import open_run
from tests.pipeline.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_format_and_broken_file(odd_image_folder, tmp_path):
    config = tiny_config(tmp_path, odd_image_folder, **{"input.labels": "none",
                                                        "output.embedding_dtype": "float16"})
    run = open_run(config, str(tmp_path / "run"))
    embed_images(config, run)
    emb = storage.read_parquet(run.embeddings)
    errors = storage.read_parquet(run.errors)
    good = {os.path.basename(u) for u in emb["uri"].to_pylist()}
    bad = dict(zip([os.path.basename(u) for u in errors["uri"].to_pylist()],
                   errors["error"].to_pylist()))
    assert set(bad) == {"truncated.jpg", "text.png"}
    assert "truncated" in bad["truncated.jpg"] and "not an image" in bad["text.png"]
    assert good == {"rgb.webp", "rgb.bmp", "rgb.tiff", "palette.gif", "palette_alpha.png",
                    "cmyk.jpg", "gray.png", "gray16.png", "tiny.png", "elongated.png",
                    "rotated_exif.jpg", "rgba.png"}
    assert set(errors["stage"].to_pylist()) == {"embed"}
    assert emb.schema.field("embedding").type == pa.list_(pa.float16(), 64)
    vectors = np.stack(emb["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert "label" not in emb.schema.names
    thumbs = storage.read_parquet(run.thumbnails)
    assert thumbs.schema == pa.schema([("id", pa.string()), ("thumbnail", pa.binary())])
    assert sorted(thumbs["id"].to_pylist()) == sorted(emb["id"].to_pylist())
    for data in thumbs["thumbnail"].to_pylist():
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and max(image.size) <= 96


def _embed_command(folder, run_dir):
    # 4 images a shard, 2 a decode batch and an encoder batch: 10 shards that complete one by
    # one, so the driver dies with the encoder pool up and the next shards in flight
    return [sys.executable, "-m", "rayclust.cli", "embed", "--input", folder,
            "--run-dir", run_dir, "--no-progress",
            "--set", "model.name=rayclust-tiny", "--set", "model.pretrained=none",
            "--set", "input.rows_per_shard=4", "--set", "embed.decode_batch_size=2",
            "--set", "model.batch_size=2"]


def test_sigkill_then_rerun_gives_every_input_exactly_once(ray_cluster, tmp_path):
    """The driver SIGKILLs itself once it has written its first shard (faults.py: an event the
    code emits, not a race with a poll, so it lands mid-stage on any machine), then the same
    command runs again."""
    from rayclust.synthetic import generate_image_folder
    folder = str(tmp_path / "img")
    generate_image_folder(folder, ("circle", "square", "stripes"), per_class=13, size=64)
    with open(os.path.join(folder, "circle", "broken.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8 broken")
    n_inputs = 40
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
               PYTHONPATH=ROOT)
    emb_dir = os.path.join(run_dir, "embeddings")

    def parts():
        return [f for f in os.listdir(emb_dir) if f.endswith(".parquet")]

    killed = subprocess.run(_embed_command(folder, run_dir), cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**env, DRIVER_FAULT_ENV: "embed:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(os.path.join(emb_dir, "_SUCCESS")) and len(parts()) == 1
    manifest_part = os.path.join(run_dir, "manifest", "part-00000.parquet")
    listed_at = os.stat(manifest_part).st_mtime_ns
    # what a writer killed mid-write leaves (storage writes a hidden temporary, then renames)
    for folder_name in ("embeddings", "errors", "thumbnails"):
        with open(os.path.join(run_dir, folder_name, ".part-00003.parquet.x1.tmp"), "wb") as f:
            f.write(b"PAR1 half written")

    again = subprocess.run(_embed_command(folder, run_dir), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    emb = storage.read_parquet(emb_dir)
    errors = storage.read_parquet(os.path.join(run_dir, "errors"))
    manifest = storage.read_parquet(os.path.join(run_dir, "manifest"))
    assert manifest.num_rows == n_inputs
    assert emb.num_rows + errors.num_rows == n_inputs
    ids = emb["id"].to_pylist()
    assert len(set(ids)) == len(ids)
    seen = set(emb["uri"].to_pylist()) | set(errors["uri"].to_pylist())
    assert seen == set(manifest["uri"].to_pylist())
    assert [os.path.basename(u) for u in errors["uri"].to_pylist()] == ["broken.jpg"]
    assert os.stat(manifest_part).st_mtime_ns == listed_at  # listed once, never again
    # no temporary files left behind by a writer killed mid-write
    for folder_name in ("embeddings", "errors", "thumbnails"):
        assert not [f for f in os.listdir(os.path.join(run_dir, folder_name))
                    if f.startswith(".")]
