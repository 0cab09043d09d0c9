"""Process start-up: torch.distributed from torchrun's environment, megatron-core model-parallel
groups (TP, PP, DP) and per-rank seeds.

nccl when CUDA is present, gloo otherwise (then the CPU compatibility layer is switched on).
"""

import os
import random
import re
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_tropd.errors import UserError


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
):
    """Initialise torch.distributed (from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as torchrun sets
    them; a single process without them), megatron-core's parallel groups and the RNG seeds. Safe
    to call twice.

    Data parallel size is `world_size / (tp * pp)`.
    """
    from megatron.core import parallel_state

    from megatron_tropd.runtime import cpu_compat

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.enable()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _init_process_group("nccl" if use_cuda else "gloo", timedelta(minutes=timeout_minutes))
    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel != 0:
        raise UserError(
            f"world size {world_size} is not divisible by tensor-model-parallel size "
            f"{tensor_model_parallel_size} x pipeline-model-parallel size "
            f"{pipeline_model_parallel_size}"
        )
    with cpu_compat.cuda_to_cpu():  # megatron's groups and RNG tracker
        if parallel_state.model_parallel_is_initialized():
            if (
                parallel_state.get_tensor_model_parallel_world_size() != tensor_model_parallel_size
                or parallel_state.get_pipeline_model_parallel_world_size()
                != pipeline_model_parallel_size
            ):
                parallel_state.destroy_model_parallel()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tensor_model_parallel_size,
                pipeline_model_parallel_size=pipeline_model_parallel_size,
            )
        set_seed(seed)


def _init_process_group(backend: str, timeout: timedelta):
    """Under torchrun (WORLD_SIZE and the rendezvous address in the environment): rank 0 serves
    the store at MASTER_ADDR:MASTER_PORT, and a failure to serve or reach it is a one-line
    `UserError` naming the address. A plain single process needs no port: its store is
    in memory, so any number of them run side by side on one host."""
    if "WORLD_SIZE" not in os.environ:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend=backend, rank=int(os.environ.get("RANK", "0")),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    except (dist.DistError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot start the process group at {address} "
                        f"({_network_reason(e)})") from None


def _network_reason(error: Exception) -> str:
    """The short reason in a torch.distributed store error ('EADDRINUSE: address already in
    use'), else its message on one line."""
    found = re.search(r"name: (\w+), message: ([^\n]+)", str(error))
    return f"{found[1]}: {found[2].strip()}" if found else " ".join(str(error).split())


def set_seed(seed: int):
    """Seed python, numpy and torch, and megatron's model-parallel RNG tracker.

    As in Megatron-LM, each pipeline stage gets its own seed (`seed + 100 * pp_rank`), tensor-parallel
    ranks get their own streams inside megatron's tracker, and data-parallel replicas share seeds
    (so they initialise identical weights).
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy():
    """Tear down megatron's groups and the process group (tests call this between runs)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where tensors for collectives live: this rank's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    """Every rank waits for the others (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def print_rank_0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_max(values):
    """Element-wise maximum of a list of ints over every rank (what each rank passes when there is
    no process group): how ranks agree on a flag that only some of them raised."""
    flags = torch.tensor([int(v) for v in values], dtype=torch.int64, device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.tolist()


def first_error(error):
    """The first rank's error message (None on a rank that had none), on every rank, prefixed with
    that rank when there are several (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {rank}: {e}" for rank, e in enumerate(errors) if e is not None), None)
