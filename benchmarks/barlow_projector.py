"""Cost of the Barlow Twins projector: one (Barlow Twins) vs four (blockwise Barlow Twins).

At ResNet-50 shapes, one training step of the part that differs between the two methods:

* ``bt``: one 2048-8192-8192-8192 projector on the pooled 2048-d features of two views, the
  Barlow Twins loss, backward and a LARS step;
* ``blockwise``: for each of the 4 blocks, its pooling head (1x1 conv to 2048, BN, ReLU, global
  average pool) on the stage's feature map (256x56x56, 512x28x28, 1024x14x14, 2048x7x7) and its
  own 2048-8192-8192-8192 projector, the four losses summed, backward and a LARS step.

The backbone is left out (it is the same network for both). Reported per configuration:
parameters; parameter + gradient + optimiser-state bytes (LARS keeps one momentum buffer);
activations saved for the backward pass (summed over the tensors autograd saves, each storage
counted once); the peak resident memory of a fresh process doing warm-up + timed steps; and the
median time per step. Each configuration runs in its own process so the peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time

import torch
from lightly.utils.lars import LARS
from torch import nn

from ssl_lib.methods.barlow_twins import barlow_twins_loss
from ssl_lib.methods.blockwise import pool_head
from ssl_lib.models import MLPConfig, build_mlp

PROJECTOR = MLPConfig(
    hidden_dim=8192, out_dim=8192, num_layers=3, hidden_bias=False, last_bias=False
)
STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # ResNet-50 (channels, side) at 224 px
FEAT_DIM = 2048


def build(kind: str) -> tuple[nn.ModuleList, list[torch.Tensor]]:
    """The trainable modules of one configuration and the shapes of its inputs (one view)."""
    if kind == "bt":
        return nn.ModuleList([build_mlp(FEAT_DIM, PROJECTOR)]), [torch.Size([FEAT_DIM])]
    blocks = nn.ModuleList(
        nn.Sequential(pool_head(c, FEAT_DIM), build_mlp(FEAT_DIM, PROJECTOR)) for c, _ in STAGES
    )
    return blocks, [torch.Size([c, s, s]) for c, s in STAGES]


def step_fn(modules: nn.ModuleList, inputs: list[list[torch.Tensor]], opt: torch.optim.Optimizer):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = sum(
            barlow_twins_loss(m(a), m(b), scale=0.024)
            for m, (a, b) in zip(modules, inputs, strict=True)
        )
        loss.backward()
        opt.step()

    return step


def saved_activation_bytes(modules: nn.ModuleList, inputs: list[list[torch.Tensor]]) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (storages once)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in modules.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(
            barlow_twins_loss(m(a), m(b), scale=0.024)
            for m, (a, b) in zip(modules, inputs, strict=True)
        )
    return sum(seen.values())


def measure(kind: str, batch: int, repeats: int, threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    modules, shapes = build(kind)
    inputs = [[torch.randn(batch, *s) for _ in range(2)] for s in shapes]
    n_params = sum(p.numel() for p in modules.parameters())
    ones = [p for p in modules.parameters() if p.ndim <= 1]
    weights = [p for p in modules.parameters() if p.ndim > 1]
    opt = LARS(
        [{"params": weights}, {"params": ones, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-6,
    )
    activations = saved_activation_bytes(modules, inputs)
    step = step_fn(modules, inputs, opt)
    step()  # warm-up (also creates the momentum buffers)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    state = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    queue.put(
        {
            "kind": kind,
            "params": n_params,
            "param_grad_state_bytes": 2 * 4 * n_params + state,
            "activation_bytes": activations,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_ms": 1000 * statistics.median(times),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="per-view batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for kind in ("bt", "blockwise"):
        queue = ctx.Queue()
        proc = ctx.Process(
            target=measure, args=(kind, args.batch, args.repeats, args.threads, queue)
        )
        proc.start()
        results.append(queue.get())
        proc.join()
    gib = 2**30
    print(
        f"batch {args.batch} per view, {args.threads} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print(
        "| configuration | parameters | params + grads + LARS state | saved activations "
        "| peak RSS | ms / step |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    names = {"bt": "Barlow Twins: 1 projector", "blockwise": "blockwise: 4 heads + 4 projectors"}
    for r in results:
        print(
            f"| {names[r['kind']]} | {r['params'] / 1e6:.1f} M "
            f"| {r['param_grad_state_bytes'] / gib:.2f} GiB "
            f"| {r['activation_bytes'] / gib:.2f} GiB "
            f"| {r['peak_rss_bytes'] / gib:.2f} GiB | {r['step_ms']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
