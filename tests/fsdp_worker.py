"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): what BitLinear sees
inside the forward of an FSDP2-sharded model, and whether sharding or activation checkpointing
changes the loss or the gradients. Writes ``OUT/rank{r}.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from onebit import parallel as par
from onebit import quant
from onebit.config import PRESETS, ModelConfig
from onebit.model import CausalLM
from onebit.nn import BitLinear


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(**{**PRESETS["tiny"], "max_position_embeddings": 64})
    ref = CausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    seen: list[dict] = []
    forward = BitLinear.forward

    def spy(self, inp):  # what the quantizer is about to see
        w = self.weight
        seen.append({"type": type(w).__name__, "shape": list(w.shape),
                     "gamma": quant.ternary_absmean(w)[1].item()})
        return forward(self, inp)

    BitLinear.forward = spy
    _, loss = ref(x, x)
    loss.backward()
    result = {"ref": {"loss": loss.item(), "seen": seen[:]}}
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    mesh = par.device_mesh(torch.device("cpu"), world)
    for ac in (False, True):
        seen.clear()
        m = CausalLM(cfg)
        m.load_state_dict(ref.state_dict())
        m.activation_checkpointing = ac
        par.shard_model(m, mesh)
        _, loss = m(x, x)
        n_forward = len(seen)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
        result[f"fsdp_ac={ac}"] = {
            "loss": loss.item(), "seen": seen[:], "n_forward": n_forward,
            "local_shapes": {n: list(p.to_local().shape) for n, p in m.named_parameters()},
            "full_shapes": {n: list(p.shape) for n, p in m.named_parameters()},
            "grads_equal": all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads),
            "grad_max_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
