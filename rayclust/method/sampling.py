"""The order in which stage 2 visits the corpus: one global permutation per epoch.

Manifests are sorted by URI, so with the usual ``class_dir/image.jpg`` layout the corpus arrives
grouped by class. A worker-local shuffle buffer cannot undo that at scale (on CIFAR-10's layout a
1,024-row buffer leaves about 0.87 of each batch of 128 in one class, against 0.16 for i.i.d.
batches), and batches of one class make the weighted cross-entropy of stage 2 a sequence of
single-class updates. So every epoch draws a fresh permutation of all N rows from (seed, epoch)
alone: every worker can compute it, a resumed or restarted epoch sees the same rows, and no
worker needs to hear from another to know who trains on what.

Each rank takes an equal, contiguous share of whole batches. The permutation is padded by
wrapping to ``world * steps * batch_size`` rows (steps = ceil(N / (world * batch_size))), so
every image is trained on in every epoch, all ranks run the same number of full steps (their
collectives line up without a per-step agreement), and fewer than ``world * batch_size`` images
(the first ones of that epoch's permutation) are seen twice.
"""

from __future__ import annotations

import numpy as np

# Separates this stream from any other use of (seed, epoch) seeding.
_STREAM = 0x5E1C2


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n), int64, fixed by (seed, epoch) (NumPy's PCG64)."""
    sequence = np.random.SeedSequence([seed % 2**64, epoch % 2**64, _STREAM])
    return np.random.Generator(np.random.PCG64(sequence)).permutation(n).astype(np.int64)


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Full batches each rank runs per epoch: ceil(n / (world * batch_size)); 0 when n is 0."""
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch_size and world must be >= 1, got {batch_size} and {world}")
    return -(-n // (world * batch_size))


def epoch_rows(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
               world: int = 1) -> np.ndarray:
    """Row indices (int64) that `rank` of `world` trains on in `epoch`, in order: exactly
    ``steps_per_epoch(n, batch_size, world) * batch_size`` of them. The shares of all ranks are
    disjoint slices of one padded global permutation and together cover every row."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    share = steps_per_epoch(n, batch_size, world) * batch_size
    if share == 0:
        return np.zeros(0, dtype=np.int64)
    # np.resize repeats the permutation cyclically: the padding is its first rows again
    padded = np.resize(epoch_permutation(n, seed, epoch), world * share)
    return padded[rank * share:(rank + 1) * share]
