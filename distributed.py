"""Several training processes, one per GPU, under torchrun (DistributedDataParallel).

    torchrun --nproc_per_node=4 train.py --exp LA_8

One process is the default and needs none of this: every helper here is a no-op for a world of one.
Under torchrun, rank 0 alone writes the phantom, the CoT cache, logs and checkpoints (main_first,
World.main); the teacher's batch-norm statistics are averaged after each EMA update (average_buffers)
and train.py checks at every checkpoint that teacher and bank agree on every rank (check_consistent).
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import resolve_device

@dataclass
class World:
    """This process's place among the training processes: one, or torchrun's N (one per GPU)."""
    rank: int = 0
    size: int = 1

    @property
    def main(self):
        return self.rank == 0                          # the process that writes logs, checkpoints and caches


def init_world(cfg):
    """The process group and this process's device. torchrun sets WORLD_SIZE, RANK and LOCAL_RANK;
    CUDA processes talk over NCCL, CPU processes over gloo (what the test suite uses)."""
    device = resolve_device(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


@contextlib.contextmanager
def main_first(world):
    """Rank 0 runs the block first (writes the phantom, asks the LLM, fills the CoT cache); the other
    ranks then run it and find everything done, so no file is written by two processes at once."""
    if world.size > 1 and not world.main:
        dist.barrier()
    yield
    if world.size > 1 and world.main:
        dist.barrier()


def average_buffers(module, world):
    """Mean of the float buffers (batch-norm statistics) over the ranks. Parameters agree by construction
    (same start, all-reduced gradients); running statistics follow each rank's own batches."""
    if world.size > 1:
        buffers = [b for b in module.buffers() if b.dtype.is_floating_point]
        flat = torch.nn.utils.parameters_to_vector(buffers)
        dist.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat / world.size, buffers)


def check_consistent(world, tensors):
    """Raise unless every rank holds the same values in each named tensor (sums compared in float64)."""
    if world.size == 1:
        return
    sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors.values()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [name for name, a, b in zip(tensors, low.tolist(), high.tolist()) if a != b]
    if differ:
        raise RuntimeError(f"rank {world.rank}: the ranks disagree on {len(differ)} tensors, e.g. "
                           f"{differ[:3]}")


def main_process():
    """Rank 0 under torchrun (read from its environment, also after the process group is gone), else True."""
    return int(os.environ.get("RANK", "0")) == 0


def gather(world, obj):
    """Every rank's obj, in rank order (for the per-rank sampler and RNG states in a checkpoint)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
