"""CUDA checks: the method layer and a whole local run on the GPU. Skipped without CUDA."""

import pytest
import torch

from rayclust.config import SEICConfig, TACConfig
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


def test_local_run_on_cuda(tmp_path, ray_cluster):
    from rayclust.pipeline.run import run
    from rayclust.synthetic import generate_image_folder
    from tests.pipeline.conftest import tiny_config
    generate_image_folder(str(tmp_path / "img"), ("circle", "stripes"), per_class=20, size=64)
    config = tiny_config(tmp_path, str(tmp_path / "img"),
                         **{"clusters": 2, "device": "cuda", "model.device": "cuda"})
    out = run(config, str(tmp_path / "run"))
    assert out["metrics_values"]["stage1"]["device"] == "cuda"
    assert out["metrics_values"]["images"] == 40
    # the repeat reads stage1/global.pt and model.pt back (written from CPU tensors) and must
    # not mix devices, whichever candidate the guard keeps (issue 10, item 2)
    again = run(config, str(tmp_path / "run"))
    assert again["metrics_values"]["assignment_source"] == out["metrics_values"][
        "assignment_source"]


def test_kmeans_kept_on_cuda_with_cpu_centroids():
    """The guard's k-means confidence and `predict` use CPU centroids (a cached fit) with CUDA
    features without a device error."""
    from rayclust.config import GuardConfig, KMeansConfig
    from rayclust.method.kmeans import KMeansResult, spherical_kmeans
    from rayclust.method.trainer import Stage1Inputs

    f = make_vmf_features(n=1500, image_kappa=150, nouns_per_class=0, distractor_nouns=500,
                          seed=0)
    fit = spherical_kmeans(torch.tensor(f.image), 10, seed=0)
    cpu_fit = KMeansResult(fit.centroids.cpu(), fit.labels.cpu(), fit.inertia)
    model = SEIC(10, SEICConfig(epochs=2), kmeans=KMeansConfig(restarts=1), device="cuda",
                 guard=GuardConfig())
    inputs = Stage1Inputs(torch.tensor(f.image), torch.tensor(f.text))
    model.fit(f.image, f.nouns, f.noun_names, inputs=inputs, kmeans_fit=cpu_fit)
    assert model.predict(f.image).shape == (1500,)


@pytest.mark.parametrize("method", ["seic", "tac"])
def test_cuda_graph_steps_match_eager_steps(method):
    from rayclust.method.neighbours import knn
    from rayclust.method.seic import SEICObjective
    from rayclust.method.tac import TACObjective
    from rayclust.method.trainer import Stage1Inputs, Stage1Trainer
    f = make_vmf_features(n=2300, image_kappa=100, seed=4)  # 2300 % batch != 0: a partial batch
    inputs = Stage1Inputs(torch.tensor(f.image), torch.tensor(f.text))
    inputs.image_neighbours, inputs.text_neighbours = knn(inputs.image, 20), knn(inputs.text, 20)
    objective = (SEICObjective(SEICConfig(epochs=6, batch_size=512), 10) if method == "seic"
                 else TACObjective(TACConfig(epochs=6, batch_size=512, knn=20), 10))
    objective.drop_last = False
    graphed = Stage1Trainer(objective, "cuda", seed=0, cuda_graphs=True).fit(inputs)
    eager = Stage1Trainer(objective, "cuda", seed=0, cuda_graphs=False).fit(inputs)
    for a, b in zip(graphed.history, eager.history):
        assert a.loss == pytest.approx(b.loss, rel=1e-3, abs=1e-3)
    for (name, p), q in zip(graphed.model.state_dict().items(), eager.model.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-3, msg=name)
