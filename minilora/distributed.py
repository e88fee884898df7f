"""Many processes: torch.distributed set-up, the data-parallel wrappers and the rank-0 rule (launched by torchrun).

    torchrun --nproc-per-node N -m minilora.train ... [--fsdp]     # N processes; every one runs train(cfg)

torchrun starts the processes and gives each RANK, LOCAL_RANK and WORLD_SIZE in its environment; `init` joins
them into one process group (nccl on CUDA, one GPU per process chosen by LOCAL_RANK; gloo on CPU). The engine is
PyTorch's own: DistributedDataParallel (every rank holds the whole model, gradients are all-reduced) or FSDP2's
`fully_shard` (each block's parameters, then the rest, sharded over the ranks; all-gathered around each block's
forward and backward, gradients reduce-scattered).

What makes N processes compute the step of one process on the same global batch:
    data       each rank takes its own slice of every global micro-batch of N × batch_size samples (Batches)
    loss       summed over tokens and divided by the step's counted tokens summed over ALL ranks (all_reduce),
               then multiplied by N: DDP and FSDP average the ranks' gradients, so the sum of the ranks'
               gradients divided by N is exactly the gradient of the global batch
    gradients  synchronised once per step, on its last micro-batch (DDP `no_sync`, FSDP2
               `set_requires_gradient_sync`): the earlier micro-batches only accumulate locally
    writes     rank 0 alone prints, logs, samples and writes; checkpoints gather the full adapter / weights and
               optimizer state first (a collective), so a checkpoint does not depend on the number of ranks

Not handled: tensor / pipeline parallelism, HSDP meshes, CPU offload, elastic membership changes (a dead rank stops
the run: torchrun then stops the others and names the failed rank; `--resume` continues from the last checkpoint,
with any number of processes).
"""

import os
import re
import sys
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import MiniloraError

TIMEOUT = timedelta(minutes=10)  # a collective waiting longer than this for a rank that hangs raises, not hangs


# ----------------------------------------------------------------------------------------------------------
# Who am I
# ----------------------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that prints, logs, samples and writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> torch.device | None:
    """Join torchrun's process group (when WORLD_SIZE > 1) and return this process's device.

    One process: None and no process group (the trainer picks the device as usual). Under torchrun:
    cuda:LOCAL_RANK with nccl, or the CPU with gloo. Other ranks' standard output goes to /dev/null (rank 0 alone
    prints); their errors still show on standard error.
    """
    if not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise MiniloraError("--device cuda under torchrun, but torch sees no CUDA GPU; use --device cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise MiniloraError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node "
                                f"but torch sees {torch.cuda.device_count()} GPU(s) (LOCAL_RANK {local_rank}): use "
                                f"--nproc-per-node {torch.cuda.device_count()} or fewer")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    available = dist.is_available() and (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())
    if not available:
        raise MiniloraError(f"this torch build has no {backend} backend for torch.distributed "
                            f"(needed for {'CUDA' if backend == 'nccl' else 'CPU'} training with torchrun); "
                            f"install a torch build with it, or run one process with python -m minilora.train")
    if not is_distributed():
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if use_cuda else None)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints (progress, summaries, samples)
    return device


def close() -> None:
    """Wait for every rank, then leave the process group (a process exiting inside it may abort in gloo)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process of the run went away: gloo raises a RuntimeError
    "Connection closed by peer" (or "Connection reset"), nccl a DistBackendError. That process printed its own
    error; this one should say it stopped because of it, not print a traceback from inside a barrier."""
    text = str(error)
    return is_distributed() and (isinstance(error, dist.DistBackendError) or "Connection closed by peer" in text
                                 or "Connection reset by peer" in text)


@contextmanager
def stop_with_the_run():
    """Turn 'another rank died' into a one-line MiniloraError naming this rank (torchrun then reports the rank
    that failed first as the root cause)."""
    try:
        yield
    except RuntimeError as e:
        if not lost_a_peer(e):
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split(". ")[0][:200]  # without gloo's source path
        raise MiniloraError(f"stopped: another process of this run stopped first ({reason}); its own error is "
                            f"printed above, and torchrun's summary names its rank") from None


# ----------------------------------------------------------------------------------------------------------
# Numbers summed over ranks
# ----------------------------------------------------------------------------------------------------------
def all_reduce_sum(*values: float, device: torch.device | None = None) -> list[float]:
    """Each value summed over all ranks (one collective for all of them); float64 so token counts stay exact."""
    if not is_distributed():
        return list(values)
    device = device or (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                        else torch.device("cpu"))
    t = torch.tensor(values, dtype=torch.float64, device=device)  # (len(values),)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (small Python objects only)."""
    if not is_distributed():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------------------------------------------------
# Wrapping the model
# ----------------------------------------------------------------------------------------------------------
def wrap_model(model: torch.nn.Module, fsdp: bool, device: torch.device) -> torch.nn.Module:
    """DDP (default) or FSDP2 around the model; the model itself when there is one process.

    FSDP2: `fully_shard` each block, then the root (embeddings, final norm, head), so one block at a time is
    gathered. QLoRA's 4-bit weights become NF4Tensor parameters FSDP2 can cut (quant/nf4_tensor.py; loaded
    rank-locally, each rank holds only its rows already); a weight whose shard boundary would not fall on a
    quantization block stays whole on every rank (printed).
    DDP keeps the 4-bit base as it is (it is not a parameter: DDP neither broadcasts nor reduces it).
    """
    if not is_distributed():
        if fsdp:
            print("note: --fsdp with one process: nothing to shard, training as usual")
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)  # no trainable buffers; rope caches are derived
    from torch.distributed.fsdp import fully_shard

    from .quant.nf4_tensor import shard_summary, to_shardable_nf4

    whole = to_shardable_nf4(model, world_size())  # 4-bit weights whose shards would cut a block: kept whole
    if whole:
        print(f"note: {whole} 4-bit weight(s) cannot be cut into {world_size()} block-aligned shards "
              f"and stay whole on every rank")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    local, whole = shard_summary(model)  # bytes of 4-bit codes + block scales (QLoRA); 0 otherwise
    if whole:
        per_rank = all_gather_object(local)
        print("4-bit base (codes + block scales) per rank: "
              + ", ".join(f"rank {r}: {b:,} B" for r, b in enumerate(per_rank)) + f" of {whole:,} B")
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 changes the module in place: it is its own model)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's forward + backward: reduce gradients over ranks only when `sync`."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return nullcontext()


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor under FSDP2: every rank holds the same value)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ----------------------------------------------------------------------------------------------------------
# Full state from shards (saving) and shards from full state (resuming)
# ----------------------------------------------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextmanager
def full_trainable_parameters(model: torch.nn.Module):
    """Inside: every trainable parameter is its whole tensor on every rank (FSDP2 shards are all-gathered, then
    put back on exit). So save_adapter / save_model read complete weights. Frozen ones (the base) stay sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():  # FSDP2 leaves the root gathered after a forward: back to shards first
        if isinstance(module, FSDPModule):
            module.reshard()
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and _is_dtensor(p):
                module._parameters[name] = torch.nn.Parameter(p.full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor (FSDP2's DTensors) gathered whole, on the CPU: the
    same layout one process writes, so a checkpoint resumes with any number of ranks. Every rank must call it."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state["state"] = {index: {key: value.full_tensor().cpu() if _is_dtensor(value) else value
                              for key, value in per_param.items()}
                      for index, per_param in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state; under FSDP2 each rank keeps the shard of each tensor that matches its param."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]  # the ids state_dict() numbers

    def shard(p, value):
        if _is_dtensor(p) and torch.is_tensor(value) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    state = {**state, "state": {index: {key: shard(params[int(index)], value) for key, value in per_param.items()}
                                for index, per_param in state["state"].items()}}
    optimizer.load_state_dict(state)


def copy_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) where dst may be an FSDP2 shard: then each rank copies its own part of the full `src`."""
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src)


def load_full_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy full tensors into the model's (possibly sharded) parameters and buffers; return the unknown names."""
    live = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in weights.items():
            if name in live:
                copy_full_(live[name], tensor)
    return [name for name in weights if name not in live]
