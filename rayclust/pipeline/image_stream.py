"""Ray Data streams of decoded images for stage 2 (RAY.md 2.3): a worker's share of an epoch's
global permutation for training, and its share of the corpus for a pseudo-label table refresh.

The rows come from `<run>/stage2/images.parquet` (idx, id, uri: the dense index of the embedded
corpus); decode runs in CPU tasks (`decode.decode_pixels`) at the model's input size, uint8.
"""

from __future__ import annotations

import pyarrow as pa

from rayclust.config import Config
from rayclust.method.sampling import epoch_rows
from rayclust.pipeline.decode import decode_pixels

# Decode parallelism comes from the number of input blocks; more blocks than this only add
# per-block puts and metadata tasks (each epoch of each worker builds its own stream).
_MAX_BLOCKS = 1024


def rows_dataset(config: Config, rows: pa.Table, preprocess):
    """Ray Data stream of (idx, pixels uint8 at the model's input size, ok) for `rows`
    (idx, uri), decoded by CPU tasks. The rows start as in-memory Arrow blocks of at least
    `embed.decode_batch_size` rows (~100 bytes a row), each a contiguous run of `rows`: on this
    scale that avoids a file-listing and read stage per stream."""
    import ray

    e = config.embed
    size = max(e.decode_batch_size, -(-rows.num_rows // _MAX_BLOCKS))
    blocks = [rows.slice(i, size) for i in range(0, rows.num_rows, size)]
    ds = ray.data.from_arrow(blocks or [rows])
    return ds.map_batches(decode_pixels, batch_size=e.decode_batch_size, batch_format="numpy",
                          num_cpus=e.decode_cpus, memory=e.decode_memory_mb * 2**20 or None,
                          fn_kwargs={"options": config.storage, "preprocess": preprocess})


def refresh_dataset(config: Config, images: pa.Table, preprocess, rank: int, world: int):
    """One worker's share of a table refresh: the rows with idx % world == rank, each exactly
    once (not a training share, which repeats a few rows to even out the steps)."""
    rows = images.select(["idx", "uri"])
    return rows_dataset(config, rows.filter(pa.array(rows["idx"].to_numpy() % world == rank)),
                        preprocess)


def epoch_dataset(config: Config, images: pa.Table, preprocess, epoch: int, rank: int,
                  world: int):
    """One worker's training stream for `epoch`: its share of that epoch's global permutation
    (`method.sampling.epoch_rows`), `steps_per_epoch * stage2.batch_size` rows. Ray Data does not
    preserve the order across blocks, but every block is a random draw from the corpus, so the
    composition of each batch is as random as the permutation."""
    order = epoch_rows(images.num_rows, config.stage2.batch_size, config.seed, epoch, rank, world)
    return rows_dataset(config, images.select(["idx", "uri"]).take(order), preprocess)


def epoch_batches(config: Config, dataset, steps: int):
    """The `steps` batches (dicts of numpy arrays, `stage2.batch_size` rows each) of an epoch's
    stream; raises if the stream ends early (a silent short epoch would leave the other ranks
    waiting in a collective)."""
    batches = dataset.iter_batches(batch_size=config.stage2.batch_size, batch_format="numpy",
                                   drop_last=True)
    count = 0
    for batch in batches:
        if count == steps:
            break
        count += 1
        yield batch
    if count < steps:
        raise RuntimeError(f"the epoch's image stream gave {count} batches, expected {steps}")
