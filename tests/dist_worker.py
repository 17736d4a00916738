"""Helper for test_distributed.py: one rank of a two-process gloo run of one contrastive step."""

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from gigassl_fast.distributed import convert_global_bn
    from gigassl_fast.train import build_model, contrastive_step

    data = torch.load(os.path.join(out, "inputs.pt"))
    torch.manual_seed(0)
    model = build_model("sparse-layer4", 256)
    model = convert_global_bn(model)
    model.backbone.configure_distributed()
    model.train()
    half = data["f1"].shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    loss, _ = contrastive_step(model, (data["f1"][sl], data["l1"][sl]), (data["f2"][sl], data["l2"][sl]), 0.05)
    if rank == 0:
        torch.save({"loss": loss, "grads": {n: p.grad for n, p in model.named_parameters()}},
                   os.path.join(out, "dist.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
