"""What a stage-2 worker's batches actually contain (issue 10 item 1): the Ray Data streams the
workers build each epoch, on a corpus whose manifest order groups the images by class."""

import numpy as np
import pytest

from rayclust.method import ClusterResult
from rayclust.method.sampling import steps_per_epoch
from rayclust.pipeline import image_stream, stage2
from rayclust.pipeline.clip_actors import describe_encoder
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import read_images
from rayclust.synthetic import DEMO_CLASSES, generate_image_folder
from tests.pipeline.conftest import tiny_config

pytestmark = pytest.mark.ray

PER_CLASS, BATCH = 30, 12


class _Corpus:
    def __init__(self, uris):
        self.uris = sorted(uris)  # the manifest's URI order: class by class
        self.ids = [f"id-{i:05d}" for i in range(len(self.uris))]


def _iid_majority_share(classes: np.ndarray, batch: int, draws: int = 20000) -> float:
    """E[largest class count / batch] for batches drawn i.i.d. from the corpus."""
    rng = np.random.default_rng(0)
    samples = classes[rng.integers(0, len(classes), (draws, batch))]
    return float(np.mean([np.bincount(s).max() / batch for s in samples]))


@pytest.fixture(scope="module")
def sorted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("order")
    uris = generate_image_folder(str(tmp / "images"), DEMO_CLASSES, per_class=PER_CLASS, size=32,
                                 seed=5)
    corpus = _Corpus(uris)
    classes = np.array([DEMO_CLASSES.index(u.split("/")[-2]) for u in corpus.uris])
    # grouped by class, as the manifest leaves it
    assert (np.diff(classes) != 0).sum() == len(DEMO_CLASSES) - 1
    config = tiny_config(tmp, **{"stage2.batch_size": BATCH, "embed.decode_batch_size": 8})
    run = RunDirectory(str(tmp / "run"))
    first = ClusterResult(classes, np.full(len(classes), 0.9, np.float32), "heads", [], [])
    stage2.prepare(config, run, corpus, first)
    return config, run, classes


@pytest.mark.parametrize("world", [1, 2])
def test_worker_batches_mix_a_class_sorted_corpus(sorted_run, world):
    config, run, classes = sorted_run
    images = read_images(run)
    preprocess = describe_encoder(config).preprocess
    n = len(classes)
    steps = steps_per_epoch(n, BATCH, world)
    shares, orders = [], []
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            dataset = image_stream.epoch_dataset(config, images, preprocess, epoch, rank, world)
            batches = list(image_stream.epoch_batches(config, dataset, steps))
            assert len(batches) == steps  # every rank the same number of full steps
            for batch in batches:
                assert len(batch["idx"]) == BATCH and batch["ok"].all()
                assert batch["pixels"].shape[1:] == (*preprocess.size, 3)
                shares.append(np.bincount(classes[batch["idx"]]).max() / BATCH)
                seen.extend(batch["idx"].tolist())
        assert set(seen) == set(range(n))  # every image in every epoch
        assert len(seen) - n < world * BATCH
        orders.append(seen)
    assert orders[0] != orders[1]  # a fresh permutation each epoch
    iid = _iid_majority_share(classes, BATCH)
    mean_share = float(np.mean(shares))
    # URI order would give ~1.0 here; i.i.d. batches ~0.33
    assert mean_share < 2 * iid, (mean_share, iid)
    assert mean_share < 1.25 * iid, (mean_share, iid)


def test_refresh_shares_cover_every_image_once(sorted_run):
    config, run, classes = sorted_run
    preprocess = describe_encoder(config).preprocess
    seen = []
    for rank in range(2):
        dataset = image_stream.refresh_dataset(config, read_images(run), preprocess, rank, 2)
        for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
            assert (batch["idx"] % 2 == rank).all()
            seen.extend(batch["idx"].tolist())
    assert sorted(seen) == list(range(len(classes)))
