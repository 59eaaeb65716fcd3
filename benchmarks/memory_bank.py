"""Per-step cost of the memory-bank side of an MSF step.

One step = enqueue the B target embeddings ``u`` + find the k nearest bank rows of each ``u`` +
MSF loss ``mean(2 - 2 cos(q, bank[nn]))`` of the online predictions ``q`` with backward to ``q``.

Compared implementations:

* ``ours-torch`` / ``ours-faiss`` / ``ours-auto``: the bank side of
  ``ssl_lib.methods.msf.MSF.compute_loss``: :class:`ssl_lib.memory.MemoryBank` (chunked exact
  search) and the shared ``regression_loss`` on the gathered ``B x k x D`` neighbours only. The
  ``auto`` bank settles its backend with ``MemoryBank.choose_backend`` before the timing, as
  training does when it starts; the choice is printed.
* ``authors``: the official MSF step: clone the bank, two dense ``B x K`` distance matrices
  (target and online), ``topk``, gather, loss with backward through the dense online matmul.
* ``lightly``: an NNCLR-style bank module as lightly's ``NNMemoryBankModule`` behaves
  (non-persistent bank, ``clone().detach()`` every forward, dense similarity to the whole bank,
  ``argmax`` top-1, overflow rows dropped on wrap-around); it always finds 1 neighbour.
* ``floor``: a single ``(B x D) @ (D x K)`` float32 matmul, the least any exact search can do.

Methods are interleaved within each repeat so that machine noise hits all of them alike; the
table reports the median milliseconds per step and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ssl_lib.memory import MemoryBank
from ssl_lib.memory.search import faiss_available
from ssl_lib.methods.losses import regression_loss

FULL_GRID = {"K": [65536, 131072, 1024000], "D": [128, 512], "k": [1, 5, 20]}
QUICK_GRID = {"K": [131072], "D": [512], "k": [5]}


def ours_step(bank: MemoryBank, k: int) -> Callable[[Tensor, Tensor], None]:
    def step(q: Tensor, u: Tensor) -> None:
        bank.enqueue(u)
        _, idx = bank.knn(u, k)
        regression_loss(q, bank.gather(idx)).backward()

    return step


class AuthorsBank:
    """The official MSF bank step: clone + two dense distance matrices + topk + gather."""

    def __init__(self, rows: Tensor) -> None:
        self.queue = rows.clone()
        self.ptr = 0

    def step(self, q: Tensor, u: Tensor, k: int) -> None:
        b = u.shape[0]
        self.queue[self.ptr : self.ptr + b] = u  # enqueue before the search (requires K % B == 0)
        self.ptr = (self.ptr + b) % self.queue.shape[0]
        targets = self.queue.clone().detach()
        dist_t = 2 - 2 * torch.einsum("bc,kc->bk", u, targets)
        dist_q = 2 - 2 * torch.einsum("bc,kc->bk", nn.functional.normalize(q, dim=1), targets)
        _, nn_index = dist_t.topk(k, dim=1, largest=False)
        dist_q.gather(1, nn_index).mean().backward()


class LightlyStyleNNBank:
    """NNCLR-style bank as lightly's NNMemoryBankModule behaves (written from its description)."""

    def __init__(self, rows: Tensor) -> None:
        self.bank = rows.clone()  # a plain attribute: not persistent, not in checkpoints
        self.ptr = 0

    def step(self, q: Tensor, u: Tensor) -> None:
        bank = self.bank.clone().detach()
        similarity = torch.einsum("nd,md->nm", u, bank)
        nearest = bank.index_select(0, similarity.argmax(dim=1))
        # Update after the lookup; the part of a batch that runs past the end is dropped.
        room = min(u.shape[0], bank.shape[0] - self.ptr)
        self.bank[self.ptr : self.ptr + room] = u[:room]
        self.ptr = (self.ptr + room) % bank.shape[0]
        regression_loss(q, nearest.unsqueeze(1)).backward()


def time_methods(
    methods: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median milliseconds per call of each method, interleaved over ``repeats`` rounds."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in methods.values():  # warm-up
        fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_case(
    size: int, dim: int, batch: int, k: int, device: torch.device, repeats: int, chunk_size: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    rows = nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)
    u = nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device)
    q = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()

    def with_grad_reset(fn: Callable[[Tensor, Tensor], None]) -> Callable[[], None]:
        def call() -> None:
            q.grad = None
            fn(q, u)

        return call

    methods: dict[str, Callable[[], None]] = {}

    def floor() -> None:
        with torch.no_grad():
            u @ rows.T

    methods["floor"] = floor
    backends = ["torch"] + (["faiss"] if faiss_available() and device.type == "cpu" else [])
    for backend in [*backends, "auto"]:
        bank = MemoryBank(
            size, dim, payloads=(), backend=backend, chunk_size=chunk_size, init="zeros"
        )
        bank.to(device).embeddings.copy_(rows)
        if backend == "auto":
            print(f"# K={size} D={dim} k={k}: auto chose {bank.choose_backend(batch, k)}")
        methods[f"ours-{backend}"] = with_grad_reset(ours_step(bank, k))
    authors = AuthorsBank(rows)
    methods["authors"] = with_grad_reset(lambda q_, u_: authors.step(q_, u_, k))
    lightly = LightlyStyleNNBank(rows)
    methods["lightly"] = with_grad_reset(lightly.step)
    return time_methods(methods, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only K=131072, D=512, k=5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--K", type=int, nargs="+", help="bank sizes (overrides the grid)")
    parser.add_argument("--D", type=int, nargs="+", help="embedding dims (overrides the grid)")
    parser.add_argument("--k", type=int, nargs="+", help="neighbour counts (overrides the grid)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=65536)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for key in ("K", "D", "k"):
        grid[key] = getattr(args, key) or grid[key]
    device = torch.device(args.device)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"{platform.processor() or platform.machine()}, B={args.batch}, "
        f"chunk_size={args.chunk_size}, median of {args.repeats}"
    )
    names = ["floor", "ours-torch", "ours-faiss", "ours-auto", "authors", "lightly"]
    header = f"| {'K':>8} | {'D':>4} | {'k':>3} | " + " | ".join(f"{n:>17}" for n in names) + " |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    records = []
    for size in grid["K"]:
        for dim in grid["D"]:
            for k in grid["k"]:
                ms = run_case(size, dim, args.batch, k, device, args.repeats, args.chunk_size)
                cells = []
                for name in names:
                    if name not in ms:
                        cells.append(f"{'n/a':>17}")
                    else:
                        cells.append(f"{ms[name]:9.1f} ({ms[name] / ms['floor']:4.2f}x)")
                print(f"| {size:>8} | {dim:>4} | {k:>3} | " + " | ".join(cells) + " |", flush=True)
                records.append({"K": size, "D": dim, "k": k, "B": args.batch, "ms": ms})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "results": records}, f, indent=2)


if __name__ == "__main__":
    main()
