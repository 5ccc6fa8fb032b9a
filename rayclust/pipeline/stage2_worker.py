"""The stage-2 loop of one Ray Train worker (ALGORITHM.md 4.4, RAY.md 2.3-2.4).

Model: the open_clip vision tower with an adapter (`stage2.adapter`), followed by the stage-1
estimator's image classifier (`Estimator.image_classifier`, loaded from `stage1/model.pt`, which
also gives K); the text tower and the text head are not part of it. Each step takes a batch of uint8 images
from this worker's stream for the epoch, makes the strong view on the device, and minimises the
confidence-weighted cross-entropy against the pseudo-label table (or, with `refresh_epochs: 0`,
against online labels from the batch's weak view).

The data. Each epoch every worker builds its own Ray Data stream (CPU decode tasks) of its equal
share of one global permutation drawn from (seed, epoch) (`method.sampling.epoch_rows`), so
batches mix the whole corpus whatever the manifest order, every rank runs the same number of
steps, and a resumed epoch trains on the same rows. Ray Train's dataset split is not used: it
cannot reshuffle globally per epoch, and its local shuffle buffer barely mixes a class-sorted
corpus.

The table. Every `refresh_epochs` epochs each worker predicts the images it owns
(idx % world == rank; a Ray Data stream of its own, because the training shares repeat a few
rows) and the workers all-reduce dense (N,) buffers, so every worker ends with the identical table
(checked: every image predicted exactly once). Rank 0 writes `pseudo_labels/epoch-<e>.parquet`;
every rank writes the hash it holds to `stage2/sync/`. Checkpoints name the table in use and its
hash, so a restarted worker group resumes with exactly that table.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

from rayclust.config import from_dict
from rayclust.method.adapters import adapter_state_dict, apply_adapter, load_adapter_state_dict
from rayclust.method.augment import StrongAugment
from rayclust.method.estimators import load_estimator
from rayclust.method.pseudo_labels import ConfidenceEMA, PseudoLabelTable
from rayclust.method.sampling import steps_per_epoch
from rayclust.method.self_enhance import (SelfEnhancedModel, SelfEnhanceStep, compile_tower,
                                          make_optimizer, predict_uint8, trainable_parameters)
from rayclust.pipeline import train_runtime
from rayclust.pipeline.clip_actors import load_clip
from rayclust.pipeline.image_stream import epoch_batches, epoch_dataset, refresh_dataset
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import read_images


def _all_reduce(x: torch.Tensor, device: torch.device, op=None) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    y = x.to(on)
    dist.all_reduce(y, op=op or dist.ReduceOp.SUM)
    return y.to(x.device)


class _Worker:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.config = config = from_dict(cfg["config"])
        self.s2 = config.stage2
        self.run = run = RunDirectory(cfg["run"], config.storage)
        self.rank, self.world = train_runtime.rank_and_size()
        self.device = train_runtime.device()
        self.images = read_images(run)
        self.ids = self.images["id"].to_pylist()
        encoder = load_clip(config, str(self.device))
        self.preprocess = encoder.preprocess
        self.mean, self.std = encoder.preprocess.mean, encoder.preprocess.std
        visual = encoder.model.visual
        del encoder  # the text tower is not needed here
        estimator = load_estimator(run.load_torch(run.model(run.stage1)))
        self.n_clusters = estimator.n_clusters
        self.visual, self.heads = visual, estimator.state_.module
        apply_adapter(visual, self.s2.adapter, rank=self.s2.lora_rank, alpha=self.s2.lora_alpha,
                      blocks=self.s2.unfreeze_blocks, seed=config.seed)
        if self.s2.compile:
            compile_tower(visual)
        self.model = SelfEnhancedModel(visual, estimator.image_classifier(), self.mean,
                                       self.std).to(self.device)
        self.optimizer = make_optimizer(trainable_parameters(self.model), self.s2.learning_rate,
                                        self.s2.weight_decay)
        self.ema = ConfidenceEMA(self.n_clusters, self.s2.confidence_momentum).to(self.device)
        self.autocast = self.device.type == "cuda"
        self.history: list[dict] = []
        self.resumes: list[int] = []

    # -- state
    def state(self, epoch: int, table_epoch: int, table: PseudoLabelTable) -> dict:
        return {"epoch": epoch, "adapter": adapter_state_dict(self.visual),
                "heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "table_epoch": table_epoch,
                "table": self.run.pseudo_label_table(table_epoch), "table_hash": table.hash(),
                "history": self.history, "resumes": self.resumes}

    def restore(self) -> tuple[int, int, PseudoLabelTable]:
        saved = train_runtime.restored_state(self.device)
        if saved is None:
            first = self.run.pseudo_label_table(0)
            table = self.read_table(first)
            if table.hash() != self.cfg["first_table_hash"]:
                raise RuntimeError(f"{first} changed since stage 2 was prepared")
            return 0, 0, table
        load_adapter_state_dict(self.visual, saved["adapter"])
        self.heads.load_state_dict(saved["heads"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.ema.load_state_dict(saved["ema"])
        self.history = saved["history"]
        self.resumes = saved["resumes"] + [saved["epoch"]]
        table = self.read_table(saved["table"])
        if table.hash() != saved["table_hash"]:
            raise RuntimeError(f"{saved['table']} changed since the checkpoint that uses it")
        if self.rank == 0:
            log.info("stage 2: resuming after epoch %d with the table of epoch %d",
                     saved["epoch"], saved["table_epoch"])
        return saved["epoch"], saved["table_epoch"], table

    def read_table(self, uri: str) -> PseudoLabelTable:
        return PseudoLabelTable.from_arrow(self.run.read_table(uri), self.ids)

    # -- the table
    def refresh(self, epoch: int, previous: PseudoLabelTable) -> PseudoLabelTable:
        """Predict the images this worker owns; all-reduce into the identical full table."""
        started = time.perf_counter()
        n = len(self.ids)
        labels = torch.zeros(n, dtype=torch.long)
        confidence = torch.zeros(n, dtype=torch.float32)
        seen = torch.zeros(n, dtype=torch.int32)
        failed = torch.zeros(n, dtype=torch.int32)
        model = train_runtime.unwrap(self.model)
        dataset = refresh_dataset(self.config, self.images, self.preprocess, self.rank,
                                  self.world)
        for batch in dataset.iter_batches(batch_size=self.s2.inference_batch_size,
                                          batch_format="numpy"):
            idx, ok = torch.as_tensor(batch["idx"].copy()), torch.as_tensor(batch["ok"].copy())
            seen[idx] += 1
            if ok.any():
                pixels = torch.from_numpy(batch["pixels"][batch["ok"]]).to(self.device)
                label, conf = predict_uint8(model, pixels, self.mean, self.std, self.autocast)
                labels[idx[ok]] = label.cpu()
                confidence[idx[ok]] = conf.float().cpu()
            # an image unreadable now (changed since it was embedded) keeps its previous row
            bad = idx[~ok]
            labels[bad], confidence[bad], failed[bad] = (previous.labels[bad],
                                                         previous.confidence[bad], 1)
        # every index is owned by one rank: a sum of the dense buffers assembles the table
        labels = _all_reduce(labels, self.device)
        confidence = _all_reduce(confidence, self.device)
        seen = _all_reduce(seen, self.device)
        failed = _all_reduce(failed, self.device)
        if not bool((seen == 1).all()):
            raise RuntimeError(f"table refresh saw {int((seen == 0).sum())} image(s) never and "
                               f"{int((seen > 1).sum())} more than once")
        table = PseudoLabelTable.from_predictions(labels, confidence)
        run = self.run
        if self.rank == 0:
            run.write_table(table.to_arrow(self.ids), run.pseudo_label_table(epoch))
            log.info("stage 2: pseudo-label table for epoch %d (%d images, mean confidence "
                     "%.3f, %d unreadable) in %.1fs", epoch, n, float(table.confidence.mean()),
                     int(failed.sum()), time.perf_counter() - started)
        run.write_json(run.sync_record(epoch, self.rank),
                       {"epoch": epoch, "rank": self.rank, "world": self.world, "rows": n,
                        "hash": table.hash(), "unreadable": int(failed.sum())})
        return table

    # -- one epoch
    def train_epoch(self, epoch: int, table: PseudoLabelTable, step: SelfEnhanceStep) -> dict:
        s2, k = self.s2, self.n_clusters
        steps = steps_per_epoch(len(self.ids), s2.batch_size, self.world)
        dataset = epoch_dataset(self.config, self.images, self.preprocess, epoch, self.rank,
                                self.world)
        generator = torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + epoch) * 1009 + self.rank)
        started, images = time.perf_counter(), 0
        # loss, mean weight, largest pseudo-label share of the batch: summed on the device
        sums = torch.zeros(3, device=self.device)
        self.model.train()
        # every rank has exactly `steps` full batches (epoch_rows), so the collectives of the
        # steps line up without a per-step agreement
        for batch in epoch_batches(self.config, dataset, steps):
            idx = torch.as_tensor(batch["idx"].copy())
            ok = torch.as_tensor(batch["ok"].copy()).float()
            pixels = torch.from_numpy(batch["pixels"]).to(self.device, non_blocking=True)
            if s2.refresh_epochs == 0:
                labels, weights = step.online(pixels, self.ema)
            else:
                labels, weights = table.labels[idx], table.weight[idx]
            labels = labels.to(self.device)
            weights = weights.to(self.device) * ok.to(self.device)
            out = step(pixels, labels, weights, generator)
            # scatter_add, not bincount: bincount's output size costs a host sync on CUDA
            counts = torch.zeros(k, device=self.device).scatter_add_(
                0, labels, torch.ones(len(labels), device=self.device))
            majority = counts.max() / len(idx)
            sums += torch.stack([out["loss"].float(), weights.float().mean(), majority.float()])
            images += len(idx)
        seconds = time.perf_counter() - started
        loss, mean_weight, majority = (sums / max(steps, 1)).tolist()
        return {"epoch": epoch, "steps": steps, "loss": loss, "mean_weight": mean_weight,
                "batch_majority_share": majority, "seconds": seconds,
                "images_per_second_per_worker": images / seconds if seconds else 0.0}


def stage2_worker(cfg: dict) -> None:
    from ray.train.torch import prepare_model

    train_runtime.quiet_worker()
    # Ray Data hands out read-only numpy views; the batches are only read here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    w = _Worker(cfg)
    s2 = w.s2
    epoch, table_epoch, table = w.restore()
    if w.world > 1:
        w.model = prepare_model(w.model, move_to_device=False)
    augment = StrongAugment(w.mean, w.std, scale=(s2.crop_min_scale, 1.0))
    step = SelfEnhanceStep(w.model, w.optimizer, w.mean, w.std, w.device, augment=augment,
                           autocast=w.autocast)
    while epoch < s2.epochs:
        train_runtime.fault_point(cfg.get("fault"), w.run.stage2, epoch)
        if s2.refresh_epochs and epoch > table_epoch and epoch % s2.refresh_epochs == 0:
            table, table_epoch = w.refresh(epoch, table), epoch
        stats = w.train_epoch(epoch, table, step)
        w.history.append(stats)
        epoch += 1
        if w.rank == 0:
            log.info("stage 2 epoch %d/%d on %d worker(s): loss %.4f, mean weight %.3f, %d steps, "
                     "%.1f img/s per worker", epoch, s2.epochs, w.world, stats["loss"],
                     stats["mean_weight"], stats["steps"], stats["images_per_second_per_worker"])
        train_runtime.report({k: v for k, v in stats.items()},
                             w.state(epoch, table_epoch, table), f"epoch-{epoch:04d}")
    # assignment: one pass of the final model over every image
    final = w.refresh(s2.epochs, table)
    if w.rank == 0:
        run = w.run
        run.save_torch({"adapter": adapter_state_dict(w.visual), "heads": w.heads.state_dict(),
                        "adapter_kind": s2.adapter, "model": [w.config.model.name,
                                                               w.config.model.pretrained],
                        "config": cfg["config"]}, run.model(run.stage2))
        run.write_json(run.stage2_file("final.json"),
                       {"table": run.pseudo_label_table(s2.epochs), "table_hash": final.hash(),
                        "history": w.history, "resumes": w.resumes,
                        "final_mean_confidence": float(final.confidence.mean())})
