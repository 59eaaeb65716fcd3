"""Memory of the CMSF variants: the state they add to a network, computed and measured.

For each variant (``cmsf_sup``, ``cmsf_2q``, ``cmsf_km``, ``cmsf_semi``) the persistent state
is the memory bank (K x D embeddings + one int64 per row and payload), plus

* 2Q: a two-slot per-image cache (2 x N x D) with a slot pointer (int64) and a visit count
  (uint8) per image;
* KM: a one-slot per-image cache (N x D, same extras) and the cluster id of every image (int64);
* semi: the labelled-embedding buffer (S x D + labels), a labelled flag per image (bool) and the
  pseudo-labeller MLP (D x H + H + 2H (BN) + H x C + C parameters, 2H BN buffers).

The script computes these sizes from the formulas above and, at a small scale, builds the
methods and measures the bytes their state actually holds (``state_dict`` tensors, caches
included) and the size of the saved file, so the formulas are checked against the code.
It then prints the computed sizes at ImageNet scale (N = 1,281,167, K = 128,000, D = 512,
S = 128,000, C = 1000, H = 1024) for fp32 and fp16 storage. It also reports the per-step
working memory of the search (one B x chunk float32 score block, and for 2Q one chunk x D
float32 block of the second bank), against the original code's dense B x K matrices.

    python -m benchmarks.cmsf_memory                # small-scale check + ImageNet table
    python -m benchmarks.cmsf_memory --json out.json
"""

from __future__ import annotations

import argparse
import io
import json

import torch

from ssl_lib.config import config_from_dict
from ssl_lib.methods import build_method

VARIANTS = ("cmsf_sup", "cmsf_2q", "cmsf_km", "cmsf_semi")
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
PAYLOADS = {"cmsf_sup": 2, "cmsf_2q": 2, "cmsf_km": 3, "cmsf_semi": 3}  # int64 columns


def computed(
    variant: str,
    n: int,
    k_rows: int,
    dim: int,
    bank_dtype: str = "fp32",
    cache_dtype: str = "fp32",
    sup_rows: int = 128000,
    classes: int = 1000,
    hidden: int = 1024,
) -> dict[str, int]:
    """Bytes of each state component, from the formulas in the module docstring."""
    parts = {"bank": k_rows * dim * BYTES[bank_dtype] + k_rows * 8 * PAYLOADS[variant] + 16}
    if variant in ("cmsf_2q", "cmsf_km"):
        slots = 2 if variant == "cmsf_2q" else 1
        parts["image cache"] = slots * n * dim * BYTES[cache_dtype] + n * 8 + n
    if variant == "cmsf_km":
        parts["cluster ids"] = n * 8
    if variant == "cmsf_semi":
        parts["labelled buffer"] = sup_rows * dim * 4 + sup_rows * 8 + 16
        parts["labelled flags"] = n
        mlp = dim * hidden + hidden + 2 * hidden + hidden * classes + classes
        parts["pseudo-labeller"] = 4 * (mlp + 2 * hidden) + 8 + 8  # + BN counter, round count
    return parts


def measured(variant: str, n: int, k_rows: int, dim: int, cache_dtype: str) -> dict[str, int]:
    """Bytes held by a built method's non-network state, grouped like :func:`computed`."""
    method: dict = {"name": variant, "bank_size": k_rows, "k": 5}
    if variant != "cmsf_sup":
        method["num_samples"] = n
    if variant in ("cmsf_2q", "cmsf_km"):
        method["cache_dtype"] = cache_dtype
    if variant == "cmsf_km":
        method["num_clusters"] = 10
    if variant == "cmsf_semi":
        method.update(num_classes=10, sup_cache_size=2048, pseudo_hidden_dim=64)
    cfg = config_from_dict(
        {
            "method": method,
            "model": {
                "backbone": "tiny_cnn",
                "projector": {"hidden_dim": 32, "out_dim": dim},
                "predictor": {"hidden_dim": 32, "out_dim": dim},
            },
            "data": {"dataset": "synthetic", "image_size": 32, "batch_size": 64},
        }
    )
    model = build_method(cfg)
    groups = {
        "bank.": "bank",
        "cache.": "image cache",
        "cluster_ids": "cluster ids",
        "sup_cache.": "labelled buffer",
        "is_labelled": "labelled flags",
        "pseudo_head.": "pseudo-labeller",
        "pseudo_rounds": "pseudo-labeller",
    }
    out: dict[str, int] = {}
    for key, value in model.state_dict().items():
        group = next((g for prefix, g in groups.items() if key.startswith(prefix)), None)
        if group is None:
            continue
        tensors = value.values() if isinstance(value, dict) else [value]
        out[group] = out.get(group, 0) + sum(t.numel() * t.element_size() for t in tensors)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("backbone", "projector", "predictor", "target"))
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    out["saved file"] = buf.tell()
    return out


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    results: dict = {"small": {}, "imagenet": {}}

    n, k_rows, dim = 20000, 4096, 128
    print(
        f"## Small scale, measured vs computed (N={n}, K={k_rows}, D={dim}; semi: S=2048, "
        "C=10, H=64)\n"
    )
    print("| variant | cache dtype | component | measured | computed |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        for cache_dtype in ("fp32", "fp16") if variant in ("cmsf_2q", "cmsf_km") else ("fp32",):
            got = measured(variant, n, k_rows, dim, cache_dtype)
            want = computed(
                variant,
                n,
                k_rows,
                dim,
                cache_dtype=cache_dtype,
                sup_rows=2048,
                classes=10,
                hidden=64,
            )
            results["small"][f"{variant}/{cache_dtype}"] = {"measured": got, "computed": want}
            for part in want:
                print(
                    f"| {variant} | {cache_dtype} | {part} | {got.get(part, 0):,} | "
                    f"{want[part]:,} |"
                )
            total = sum(want.values())
            print(
                f"| {variant} | {cache_dtype} | saved file (state only) | "
                f"{got['saved file']:,} | {total:,} + pickle overhead |"
            )

    n, k_rows, dim, batch = 1_281_167, 128_000, 512, 256
    chunk = 65536
    print(f"\n## ImageNet scale, computed (N={n:,}, K={k_rows:,}, D={dim}, B={batch})\n")
    print("| variant | cache dtype | bank | per-image state | other | total |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        for cache_dtype in ("fp32", "fp16") if variant in ("cmsf_2q", "cmsf_km") else ("fp32",):
            parts = computed(variant, n, k_rows, dim, cache_dtype=cache_dtype)
            per_image = parts.get("image cache", 0) + parts.get("cluster ids", 0)
            per_image += parts.get("labelled flags", 0)
            other = sum(parts.values()) - parts["bank"] - per_image
            results["imagenet"][f"{variant}/{cache_dtype}"] = parts
            print(
                f"| {variant} | {cache_dtype} | {human(parts['bank'])} | {human(per_image)} | "
                f"{human(other)} | {human(sum(parts.values()))} |"
            )
    score = batch * chunk * 4
    print(
        f"\nPer-step search working memory (B={batch}, chunk={chunk:,}): one score block "
        f"{human(score)}; 2Q adds one second-bank block {human(chunk * dim * 4)} and the "
        f"B x k' x D candidates. The original builds dense B x K fp32 matrices "
        f"({human(batch * k_rows * 4)} each: d_t, d_q, 2Q's second d, masks) and copies the "
        f"K x D second bank ({human(k_rows * dim * 4)}) every step."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
