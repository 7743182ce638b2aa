"""Training past one device: DDP or FSDP2 under ``torchrun`` (``--train.parallel=auto|ddp|fsdp``).

- ``ddp``: every rank holds the whole model, its fp32 master weights, the gradients and both Adam
  moments (16 bytes per parameter), and the gradients are all-reduced (``DistributedDataParallel``).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder block and on the root
  (embeddings, final norm, LM head). Each rank keeps 1/N of every parameter, gradient and Adam
  moment (16/N bytes per parameter); a block's weights are all-gathered just before its forward
  (and again before its backward) and freed after it, gradients are reduce-scattered. Inside the
  forward, ``BitLinear`` sees the unsharded ``nn.Parameter`` (tests/test_fsdp.py checks it), so its
  absmean / absmax quantizers run over the whole weight exactly as without sharding.
- ``auto``: the layout of the checkpoint being resumed; else one process: no wrapper; several:
  ``ddp`` when 16 bytes per parameter take under half of a rank's memory (the GPU's, or this
  machine's RAM shared by the local ranks), ``fsdp`` otherwise.

Mixed precision (``train.dtype=bf16``): with fsdp on CUDA the blocks gather bf16 parameters and
reduce gradients in fp32 (``MixedPrecisionPolicy``) under autocast, so the quantizers then see the
bf16-rounded weight (the fp32 master weights stay sharded); on CPU parameters stay fp32 (autocast
only, as with ddp). The CUDA path is untested (no GPU in this project's CI): the tests run gloo on
the CPU. Checkpoints of fsdp runs are sharded (``checkpoint.py``, docs/formats.md §12).

Not done yet: every rank builds the full fp32 model on the CPU once before sharding it (4 bytes
per parameter of host memory per rank, freed after ``fully_shard``), and a fine-tune loads its
whole source on every rank.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import ConfigError

PARALLEL = ("auto", "ddp", "fsdp")
REPLICATED_BYTES_PER_PARAM = 16  # fp32 weight + fp32 gradient + two fp32 Adam moments


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets RANK, WORLD_SIZE and MASTER_ADDR for every worker."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def require_torchrun(what: str) -> None:
    if not launched_by_torchrun():
        raise ConfigError(f"{what} shards the model over the processes torchrun starts: launch it as "
                          f"`torchrun --nproc_per_node=N -m onebit train|finetune ...` (N >= 1, also to "
                          f"resume a sharded checkpoint on one process), or use --train.parallel=ddp to "
                          f"train in this one process")


def rank_memory_bytes(device: torch.device, local_world: int) -> int:
    """Memory one rank may use: its GPU's, or this machine's RAM shared by the local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62
    return total // max(1, local_world)


def choose_parallel(requested: str, world: int, saved: str | None, n_params: int,
                    device: torch.device, local_world: int) -> str:
    """The layout a run uses: "single" (one process, no wrapper), "ddp" or "fsdp".

    ``saved``: the layout of the checkpoint being resumed ("sharded" from fsdp, "full" from ddp or
    one process), None for a new run. A requested layout that cannot read it is refused, naming the fix."""
    if requested == "auto":
        if saved == "sharded":
            return "fsdp"
        if world == 1:
            return "single"
        if saved == "full":
            return "ddp"
        need = REPLICATED_BYTES_PER_PARAM * n_params
        return "ddp" if need < rank_memory_bytes(device, local_world) // 2 else "fsdp"
    if requested == "fsdp":
        return "fsdp"
    return "ddp" if world > 1 else "single"


def check_resume_layout(parallel: str, saved: str | None, folder, saved_world: int | None) -> None:
    """A requested layout ("ddp" or "fsdp") that cannot resume a checkpoint of layout ``saved``:
    ConfigError naming the fix (the other layout; fsdp reshards, so any number of ranks)."""
    if saved == "sharded" and parallel != "fsdp":
        raise ConfigError(f"cannot resume: checkpoint '{folder}' is sharded (written by train.parallel=fsdp "
                          f"on {saved_world} process(es)); resume it with --train.parallel=fsdp (or auto) "
                          f"under torchrun, on any number of processes")
    if saved == "full" and parallel == "fsdp":
        raise ConfigError(f"cannot resume: checkpoint '{folder}' holds unsharded state (written by "
                          f"train.parallel=ddp or one process); resume it with --train.parallel=ddp (or "
                          f"auto), or start the fsdp run in a new train.out_dir")


def device_mesh(device: torch.device, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def shard_model(model: nn.Module, mesh, *, bf16_params: bool = False) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` on every decoder block, then on the root (which then holds
    the embeddings, the final norm and the LM head). Parameters become ``DTensor`` shards on the
    mesh's device; ``bf16_params``: gather bf16 parameters, reduce gradients in fp32 (CUDA)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh}
    if bf16_params:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_bytes(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards only)."""
    def nbytes(t) -> int:
        if t is None or not torch.is_tensor(t):
            return 0
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    out = {"params": sum(nbytes(p) for p in model.parameters()),
           "grads": sum(nbytes(p.grad) for p in model.parameters()), "optimizer": 0}
    if opt is not None:
        out["optimizer"] = sum(nbytes(v) for st in opt.state.values() for v in st.values())
    return out
