"""Stage 2's per-epoch data order: one global permutation from (seed, epoch), equal rank shares."""

import numpy as np
import pytest

from rayclust.method.sampling import epoch_permutation, epoch_rows, steps_per_epoch


@pytest.mark.parametrize("n,batch,world", [(100, 8, 1), (100, 8, 2), (101, 4, 3), (5, 4, 2),
                                           (64, 16, 4), (1, 2, 1)])
def test_shares_are_equal_whole_batches_and_cover_every_row(n, batch, world):
    shares = [epoch_rows(n, batch, seed=7, epoch=3, rank=r, world=world) for r in range(world)]
    steps = steps_per_epoch(n, batch, world)
    assert steps == -(-n // (world * batch))
    assert all(s.dtype == np.int64 and len(s) == steps * batch for s in shares)
    rows = np.concatenate(shares)
    assert set(rows.tolist()) == set(range(n))  # every image, every epoch
    # the padding repeats fewer than world * batch rows, each at most once more (while n allows)
    counts = np.bincount(rows, minlength=n)
    assert len(rows) - n < world * batch
    if len(rows) <= 2 * n:
        assert counts.max() <= 2
    # the shares are consecutive slices of one padded permutation: disjoint when nothing is padded
    if len(rows) == n:
        assert counts.max() == 1


def test_deterministic_by_seed_and_epoch_and_fresh_every_epoch():
    n = 1000
    a = epoch_rows(n, 10, seed=0, epoch=0, rank=1, world=2)
    assert np.array_equal(a, epoch_rows(n, 10, seed=0, epoch=0, rank=1, world=2))
    assert not np.array_equal(a, epoch_rows(n, 10, seed=0, epoch=1, rank=1, world=2))
    assert not np.array_equal(a, epoch_rows(n, 10, seed=1, epoch=0, rank=1, world=2))
    # the shares of one epoch are slices of the same global permutation whatever the world size
    perm = epoch_permutation(n, 0, 0)
    assert np.array_equal(np.concatenate([epoch_rows(n, 10, 0, 0, r, 4) for r in range(4)]), perm)
    assert sorted(perm.tolist()) == list(range(n))
    # consecutive epochs are unrelated orders: few rows keep their position
    assert np.mean(epoch_permutation(n, 0, 0) == epoch_permutation(n, 0, 1)) < 0.01
    assert np.array_equal(epoch_permutation(n, -3, 2), epoch_permutation(n, -3, 2))


def test_batches_of_a_class_sorted_corpus_are_mixed():
    """The URI-sorted manifest of a class-folder corpus (CIFAR-10's layout): batches drawn from
    the epoch order have about the i.i.d. majority-class share (0.87 with a local shuffle buffer
    of 1,024 rows, issue 10)."""
    labels = np.repeat(np.arange(10), 5000)
    rng = np.random.default_rng(0)
    iid = np.mean([np.bincount(rng.integers(0, 10, 128)).max() / 128 for _ in range(2000)])
    for world in (1, 2):
        share = [np.bincount(labels[b], minlength=10).max() / 128
                 for r in range(world)
                 for b in epoch_rows(len(labels), 128, 0, 0, r, world).reshape(-1, 128)]
        assert np.mean(share) < 1.1 * iid


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        epoch_rows(10, 2, 0, 0, rank=2, world=2)
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(10, 0)
    assert len(epoch_rows(0, 4, 0, 0)) == 0
