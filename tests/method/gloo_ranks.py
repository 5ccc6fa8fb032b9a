"""Run a function on W gloo ranks in child processes (pure PyTorch, no Ray), for the tests that
compare data-parallel training with one process.

`run_ranks(body, world, out_dir)` calls `body(rank)` on every rank inside an initialised gloo
process group and returns what each rank returned (saved with torch.save, read back in order).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, body, world: int, port: int, out_dir: str, timeout_s: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        torch.save(body(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(body, world: int, out_dir, timeout_s: int = 120) -> list:
    """`body` must be a module-level function (the spawn start method pickles it).

    fork: a spawned worker re-imports torch, rayclust and torch._dynamo (~10 s of CPU each); a
    forked one starts at once. Where CUDA is present, a backward run before the fork has started
    autograd's device threads, and PyTorch refuses autograd in a child forked after that (seen on
    an H200): spawn there. RAYCLUST_TEST_START_METHOD=spawn exercises that path on a CPU machine.
    """
    forkable = "fork" in mp.get_all_start_methods() and not torch.cuda.is_available()
    method = os.environ.get("RAYCLUST_TEST_START_METHOD") or ("fork" if forkable else "spawn")
    mp.start_processes(_rank_main, args=(body, world, _free_port(), str(out_dir), timeout_s),
                       nprocs=world, join=True, start_method=method)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
