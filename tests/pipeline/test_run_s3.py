"""A whole run with images in S3 and the run directory in S3 (moto server on 127.0.0.1)."""

import json
import os

from rayclust import storage
from rayclust.pipeline.run import run
from tests.pipeline.conftest import tiny_config


def test_run_from_and_to_s3(image_folder, s3_server, s3_bucket, tmp_path):
    opts = s3_server.options
    for cls in sorted(os.listdir(image_folder)):
        for name in sorted(os.listdir(os.path.join(image_folder, cls)))[:5]:
            with open(os.path.join(image_folder, cls, name), "rb") as handle:
                storage.write_bytes(f"s3://{s3_bucket}/images/{cls}/{name}", handle.read(), opts)
    config = tiny_config(tmp_path, f"s3://{s3_bucket}/images/",
                         **{"storage.endpoint": s3_server.endpoint,
                            "storage.region": "us-east-1"})
    run_dir = f"s3://{s3_bucket}/runs/r1"
    outputs = run(config, run_dir)
    assert outputs["metrics_values"]["images"] == 15 - 1  # square/empty.png is among the first 5
    emb = storage.read_parquet(f"{run_dir}/embeddings", opts)
    assert all(u.startswith(f"s3://{s3_bucket}/images/") for u in emb["uri"].to_pylist())
    metrics = json.loads(storage.read_text(f"{run_dir}/metrics.json", opts))
    assert metrics["errors"] == 1
    assignments = storage.read_parquet(f"{run_dir}/assignments", opts)
    assert assignments.num_rows == 14
    config_text = storage.read_text(f"{run_dir}/config.yaml", opts)
    assert s3_server.endpoint in config_text
    assert "testing" not in config_text  # the credentials never reach outputs
    assert storage.exists(f"{run_dir}/stage1/checkpoint.pt", opts)
