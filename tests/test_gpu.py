"""CUDA checks: the method layer and a whole local run on the GPU. Skipped without CUDA."""

import pytest
import torch

from rayclust.config import GuardConfig, SEICConfig, TACConfig
from rayclust.method import SEIC, TAC
from rayclust.method.metrics import cluster_accuracy
from rayclust.synthetic import make_vmf_features

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("cls, config", [(SEIC, SEICConfig(epochs=30)), (TAC, TACConfig())])
def test_stage1_on_cuda(cls, config):
    f = make_vmf_features(n=5000, image_kappa=60, seed=0)
    model = cls(10, config, device="cuda").fit(f.image, f.nouns, f.noun_names)
    assert next(model.state_.model.parameters()).is_cuda
    assert cluster_accuracy(f.labels, model.labels_) >= 0.4


def test_kmeans_and_knn_on_cuda_match_cpu():
    from rayclust.method.kmeans import spherical_kmeans
    from rayclust.method.neighbours import knn
    f = make_vmf_features(n=2000, image_kappa=300, seed=2)
    x = torch.tensor(f.image)
    cpu, gpu = knn(x, 10), knn(x.cuda(), 10).cpu()
    assert (cpu == gpu).float().mean() > 0.99
    fit = spherical_kmeans(x.cuda(), 10, seed=0)
    assert fit.labels.is_cuda
    assert cluster_accuracy(f.labels, fit.labels.cpu().numpy()) > 0.8


def test_local_run_on_cuda(tmp_path):
    from rayclust.pipeline.run import run
    from rayclust.synthetic import generate_image_folder
    from tests.pipeline.conftest import tiny_config
    generate_image_folder(str(tmp_path / "img"), ("circle", "stripes"), per_class=20, size=64)
    config = tiny_config(tmp_path, str(tmp_path / "img"),
                         **{"clusters": 2, "device": "cuda", "model.device": "cuda"})
    out = run(config, str(tmp_path / "run"))
    assert out["metrics_values"]["stage1"]["device"] == "cuda"
    assert out["metrics_values"]["images"] == 40
