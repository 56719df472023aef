"""A detection head over roi_pool trained with DistributedDataParallel, checked against one process.

Run with torchrun, e.g. on CPUs (gloo) or GPUs (NCCL, one GPU per rank):

    torchrun --nproc-per-node=2 examples/ddp_roi_head.py --dist-backend gloo
    torchrun --nproc-per-node=2 examples/ddp_roi_head.py --dist-backend nccl --compile

Every rank takes its share of a fixed global batch; rank 0 also runs the whole batch in a single
process and compares losses and gradients step by step. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import roi_ops

IMAGES, BOXES_PER_IMAGE, CLASSES = 4, 6, 5


class RoiHead(torch.nn.Module):
    """A conv trunk, roi_pool at stride 4, and a classifier per box."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
        )
        self.pool = roi_ops.RoIPool(4, spatial_scale=1 / 4, backend=backend)
        self.classify = torch.nn.Linear(16 * 4 * 4, CLASSES)

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.pool(self.trunk(images), boxes).flatten(1))


def global_batch(step: int, device: torch.device):
    """The same images, boxes and labels on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(IMAGES, 3, 64, 80, generator=g)
    corners = torch.rand(IMAGES, BOXES_PER_IMAGE, 2, generator=g) * torch.tensor([60.0, 48.0])
    sizes = 4 + torch.rand(IMAGES, BOXES_PER_IMAGE, 2, generator=g) * 24
    boxes = torch.cat([corners, corners + sizes], dim=2)
    labels = torch.randint(0, CLASSES, (IMAGES, BOXES_PER_IMAGE), generator=g)
    return images.to(device), [b.to(device) for b in boxes], labels.to(device)


def loss_of(model, images, boxes, labels):
    logits = model(images, boxes)
    return torch.nn.functional.cross_entropy(logits, labels.flatten())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dist-backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--roi-backend", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--report", default=None, help="rank 0 writes a JSON report here")
    args = parser.parse_args()

    dist.init_process_group(args.dist_backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.dist_backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)
    model = RoiHead(args.roi_backend).to(device)
    single = RoiHead(args.roi_backend).to(device)
    single.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    step_fn = torch.compile(ddp) if args.compile else ddp
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.1)
    share = IMAGES // world
    mine = slice(rank * share, (rank + 1) * share)
    report = {"world": world, "device": str(device), "compile": args.compile, "steps": []}
    ok = True
    for step in range(args.steps):
        images, boxes, labels = global_batch(step, device)
        opt.zero_grad()
        loss = loss_of(step_fn, images[mine], boxes[mine], labels[mine])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        if rank == 0:
            single_opt.zero_grad()
            single_loss = loss_of(single, images, boxes, labels)
            single_loss.backward()
            grad_diff = max(
                (a.grad - b.grad).abs().max().item()
                for a, b in zip(model.parameters(), single.parameters(), strict=True)
            )
            loss_diff = abs(mean_loss.item() - single_loss.item())
            close = grad_diff <= 1e-5 and loss_diff <= 1e-5
            ok &= close
            report["steps"].append(
                {
                    "step": step,
                    "ddp_loss": mean_loss.item(),
                    "single_loss": single_loss.item(),
                    "max_grad_diff": grad_diff,
                    "match": close,
                }
            )
            print(
                f"step {step}: ddp loss {mean_loss.item():.6f} single {single_loss.item():.6f} "
                f"max |grad diff| {grad_diff:.2e} {'match' if close else 'MISMATCH'}"
            )
            single_opt.step()
        opt.step()
    verdict = torch.tensor(int(ok), device=device)
    dist.broadcast(verdict, 0)
    result = 0 if verdict.item() else 1
    if rank == 0 and args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    del step_fn, ddp, opt, verdict  # release what holds the process group, then destroy it
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalisation: with gloo, torch's worker threads sometimes abort the
    # process while the interpreter tears down, after destroy_process_group ("terminate called
    # without an active exception"; 1 to 3 runs in 12 with torch 2.13 on a 2-core machine,
    # with or without roi_ops' changes). Everything that matters has been written by then.
    os._exit(code)
