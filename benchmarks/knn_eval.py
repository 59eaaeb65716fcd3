"""kNN evaluation benchmark: one chunked top-max(k) search vs. one full search per (k, T).

Every variant runs in its own child process on the same seeded synthetic features, so that the
child's peak resident memory (``ru_maxrss``) belongs to that variant alone. Variants:

* ``ours``: :func:`ssl_lib.eval.knn.knn_evaluate`: one top-200 search, then all k in {1, 20, 200}
  x T in {0.07, 0.1} weighted votes and the majority votes for every k.
* ``solo``: the offline protocol of solo-learn, re-implemented: for every (k, T) a fresh pass
  over query chunks of ``max(1, 5e6 // N)`` rows, each with a full chunk x N similarity,
  ``topk``, and a one-hot weighted vote.
* ``lightly``: the protocol of lightly's kNN classifier, re-implemented: for every (k, T), query
  batches of 512 with a full batch x N similarity against a (D, N) bank, ``topk``, and a
  one-hot weighted vote.

Example (the CPU figures in ``benchmarks/README.md``)::

    python benchmarks/knn_eval.py --bank 50000 --queries 10000 --dim 512 --repeats 2

ImageNet scale on a GPU (``--estimate-only`` prints the memory plan without running)::

    python benchmarks/knn_eval.py --device cuda --bank 1281167 --dim 2048 --queries 50000 --fp16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lib.eval.knn import (  # noqa: E402
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    knn_evaluate,
    topk_accuracy,
)

KS = (1, 20, 200)
TEMPERATURES = (0.07, 0.1)
VARIANTS = ("ours", "solo", "lightly")
GEN_ROWS = 16384
LIGHTLY_BATCH = 512
SOLO_MAX_MATRIX = int(5e6)
MIB = 1 << 20


def make_features(n: int, dim: int, classes: int, dtype: torch.dtype, seed: int, device: str):
    """Seeded, L2-normalised class-structured features, generated in row blocks."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(12345))
    labels = torch.randint(0, classes, (n,), generator=g)
    feats = torch.empty(n, dim, dtype=dtype, device=device)
    for start in range(0, n, GEN_ROWS):
        rows = centres[labels[start : start + GEN_ROWS]]
        rows += 5.0 * torch.randn(rows.shape, generator=g)
        feats[start : start + GEN_ROWS] = torch.nn.functional.normalize(rows, dim=1)
    return feats, labels.to(device)


def weighted_vote(sims, neighbour_labels, classes: int, temperature: float) -> torch.Tensor:
    """One-hot weighted vote as the peers implement it; returns classes ranked best-first."""
    rows, k = neighbour_labels.shape
    one_hot = torch.zeros(rows * k, classes, device=sims.device)
    one_hot.scatter_(1, neighbour_labels.reshape(-1, 1), 1.0)
    weights = (sims / temperature).exp()
    scores = (one_hot.view(rows, k, classes) * weights.unsqueeze(-1)).sum(1)
    return scores.argsort(dim=1, descending=True)


def run_peer(bank, bank_labels, queries, query_labels, classes: int, chunk: int, transposed: bool):
    """Full similarity pass per (k, T): solo-learn (``transposed=False``) or lightly style."""
    bank_matrix = bank.T.contiguous() if transposed else bank
    results = {}
    for k in KS:
        for temperature in TEMPERATURES:
            ranked = []
            for start in range(0, queries.shape[0], chunk):
                q = queries[start : start + chunk]
                sims = q @ bank_matrix if transposed else q @ bank_matrix.T
                top_sims, top_idx = sims.topk(k, dim=1)
                ranked.append(weighted_vote(top_sims, bank_labels[top_idx], classes, temperature))
            ranked = torch.cat(ranked)
            for n in (1, 5):
                key = f"weighted/k={k}/T={temperature:g}/top{n}"
                results[key] = topk_accuracy(ranked, query_labels, n)
    return results


def largest_temporaries(args) -> dict[str, int]:
    """Bytes of the largest transient buffers each variant holds at once (float32 unless noted)."""
    k, n, q, d, c = max(KS), args.bank, args.queries, args.dim, args.classes
    qc, bc = min(args.query_chunk, q), min(args.bank_chunk, n)
    solo_chunk = min(max(1, SOLO_MAX_MATRIX // n), q)
    # A float16 bank is converted chunk by chunk by ours, and as a whole by the peers.
    chunk_copy = bc * d * 4 if args.fp16 else 0
    bank_copy = n * d * 4 if args.fp16 else 0
    return {
        # similarity block + float32 bank chunk + query chunk + running and merged top-k.
        "ours": qc * bc * 4 + chunk_copy + qc * d * 4 + 2 * q * k * 12 + qc * 2 * k * 12,
        # chunk x N similarities + one-hot and its weighted product (chunk x k x C each).
        "solo": solo_chunk * n * 4 + 2 * solo_chunk * k * c * 4 + bank_copy,
        # the same per batch of 512, plus the transposed (D, N) float32 copy of the bank.
        "lightly": LIGHTLY_BATCH * n * 4 + 2 * LIGHTLY_BATCH * k * c * 4 + n * d * 4 + bank_copy,
    }


def proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (Linux >= 4.0) so set-up transients do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(args) -> None:
    dtype = torch.float16 if args.fp16 else torch.float32
    bank, bank_labels = make_features(args.bank, args.dim, args.classes, dtype, args.seed, "cpu")
    queries, query_labels = make_features(
        args.queries, args.dim, args.classes, torch.float32, args.seed + 1, "cpu"
    )
    if args.device != "cpu":
        queries, query_labels = queries.to(args.device), query_labels.to(args.device)
        bank, bank_labels = bank.to(args.device), bank_labels.to(args.device)
        torch.cuda.reset_peak_memory_stats()
    setup_rss = proc_status_bytes("VmRSS")
    peak_was_reset = reset_peak_rss()
    start, start_cpu = time.perf_counter(), time.process_time()
    if args.variant == "ours":
        results = knn_evaluate(
            bank,
            bank_labels,
            queries,
            query_labels,
            KS,
            TEMPERATURES,
            num_classes=args.classes,
            backend=args.backend,
            query_chunk=args.query_chunk,
            bank_chunk=args.bank_chunk,
        )
    else:
        bank32 = bank.float()  # the peers compute in the bank's dtype; float32 on CPU
        if args.variant == "solo":
            chunk = max(1, SOLO_MAX_MATRIX // args.bank)
            results = run_peer(
                bank32, bank_labels, queries, query_labels, args.classes, chunk, False
            )
        else:
            results = run_peer(
                bank32, bank_labels, queries, query_labels, args.classes, LIGHTLY_BATCH, True
            )
    if args.device != "cpu":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    # Without the reset, fall back to the lifetime peak, which includes data generation.
    if peak_was_reset:
        peak_rss = proc_status_bytes("VmHWM")
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "variant": args.variant,
        "peak_rss_reset": peak_was_reset,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss": peak_rss,
        "setup_rss": setup_rss,
        "results": results,
    }
    if args.device != "cpu":
        out["peak_device"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


def print_estimate(args) -> None:
    itemsize = 2 if args.fp16 else 4
    temps = largest_temporaries(args)
    print(
        f"bank {args.bank} x {args.dim} {'fp16' if args.fp16 else 'fp32'}: "
        f"{args.bank * args.dim * itemsize / 1e9:.2f} GB; queries {args.queries} x {args.dim} "
        f"fp32: {args.queries * args.dim * 4 / 1e9:.2f} GB"
    )
    for name, size in temps.items():
        print(f"largest temporaries, {name}: {size / MIB:.0f} MiB")
    macs = args.queries * args.bank * args.dim
    passes = len(KS) * len(TEMPERATURES)
    print(
        f"similarity multiply-adds: ours {macs / 1e12:.2f} T (one search), "
        f"solo/lightly {passes * macs / 1e12:.2f} T ({passes} searches)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bank", type=int, default=50000)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--fp16", action="store_true", help="store the bank in float16")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "faiss"])
    p.add_argument("--query-chunk", type=int, default=DEFAULT_QUERY_CHUNK)
    p.add_argument("--bank-chunk", type=int, default=DEFAULT_BANK_CHUNK)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="rounds over all variants")
    p.add_argument("--estimate-only", action="store_true")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.variant:
        worker(args)
        return
    print_estimate(args)
    if args.estimate_only:
        return
    temps = largest_temporaries(args)
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):  # variants alternate, so load changes hit all of them
        for variant in variants:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            run = runs[variant][-1]
            backend = run["results"].get("backend")
            print(
                f"round {repeat + 1}, {variant}: {run['seconds']:.1f} s wall, "
                f"{run['cpu_seconds']:.1f} s CPU" + (f", backend {backend}" if backend else ""),
                flush=True,
            )
    # Per variant: the fastest run's record, with the largest peak memory over all runs.
    rows = []
    for variant in variants:
        best = min(runs[variant], key=lambda r: r["seconds"])
        rows.append({**best, "all_seconds": [r["seconds"] for r in runs[variant]]})
        rows[-1]["cpu_seconds"] = min(r["cpu_seconds"] for r in runs[variant])
        rows[-1]["peak_rss"] = max(r["peak_rss"] for r in runs[variant])
        rows[-1]["extra_rss"] = max(r["peak_rss"] - r["setup_rss"] for r in runs[variant])
    ours = next((r for r in rows if r["variant"] == "ours"), None)
    print(
        "\n| variant | wall s (min) | all runs (s) | x slower than ours | CPU s (min) "
        "| CPU x ours | peak RSS (MiB) "
        "| peak - setup RSS (MiB) | largest temporaries (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['seconds'] / ours['seconds']:.1f}" if ours else "-"
        cpu_ratio = f"{r['cpu_seconds'] / ours['cpu_seconds']:.1f}" if ours else "-"
        every = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
        print(
            f"| {r['variant']} | {r['seconds']:.1f} | {every} | {ratio} "
            f"| {r['cpu_seconds']:.1f} | {cpu_ratio} "
            f"| {r['peak_rss'] / MIB:.0f} | {r['extra_rss'] / MIB:.0f} "
            f"| {temps[r['variant']] / MIB:.0f} |"
        )
    if ours:
        for r in rows:
            if r is ours:
                continue
            # Top-5 at k=1 is left out: one class gets the vote and the order of the other,
            # vote-less classes is arbitrary in every implementation.
            shared = [
                key
                for key in r["results"]
                if key.endswith("top1") or not key.startswith("weighted/k=1/")
            ]
            diffs = [abs(r["results"][key] - ours["results"][key]) for key in shared]
            print(
                f"{r['variant']}: {len(diffs)} shared accuracies, "
                f"max |difference| vs ours {max(diffs):.3f} points"
            )
        print("ours:", {k: round(v, 2) for k, v in ours["results"].items() if k.endswith("top1")})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
