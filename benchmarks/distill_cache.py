"""Teacher feature cache: memory of reading it, and training speed with an online vs cached teacher.

Memory (``--rows``, ``--dim``): a cache of ``rows x dim`` float16 features is written in the
layout of ``ssl-lib cache-features`` (random values; ``meta.json`` and ``paths.txt`` as the
command writes them). A fresh child process per variant then reads one epoch of it in shuffled
batches of 256 rows and reports its peak resident memory, split into anonymous memory (the
process's own allocations) and file-backed pages (the page cache mapped in, which the kernel can
drop at any time):

* ``memmap``: :class:`ssl_lib.distill.TeacherCache` (``numpy.memmap``; only the batch's rows
  are read);
* ``load-whole``: the whole file read into memory first (what a ``torch.load``-able cache, as in
  the SimReg and CompRess code, does).

The full-size figures (ImageNet, 1,281,167 x 2048) are computed from the measured ones:
anonymous memory of ``memmap`` does not grow with the rows, that of ``load-whole`` is the file.

Speed (``--steps``): training steps per second of a SimReg student (``tiny_cnn``) distilled from
a ``resnet18_cifar`` teacher at 32 px on the CPU, with the teacher run online and read from a
cache of the same images (model step only: forward, backward, SGD; no data loading).

Run from the repository root (the figures in ``benchmarks/README.md``)::

    python benchmarks/distill_cache.py --rows 100000 --dim 2048 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_lib.config import config_from_dict  # noqa: E402
from ssl_lib.distill import TeacherCache, TeacherConfig, build_teacher  # noqa: E402
from ssl_lib.distill.cache import FEATURES, META, PATHS, keys_sha256  # noqa: E402
from ssl_lib.methods import build_method  # noqa: E402
from ssl_lib.models import build_backbone  # noqa: E402

IMAGENET_ROWS = 1_281_167
BATCH = 256
MIB = 1 << 20


def write_random_cache(folder: Path, rows: int, dim: int) -> None:
    """A cache folder of ``rows x dim`` random float16 features, written in chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (folder / FEATURES).open("wb") as f:
        for start in range(0, rows, 8192):
            n = min(8192, rows - start)
            f.write(rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16).tobytes())
    keys = [f"synthetic/0/{i}" for i in range(rows)]
    (folder / PATHS).write_text("\n".join(keys) + "\n")
    meta = {
        "num_samples": rows,
        "dim": dim,
        "dtype": "float16",
        "paths_sha256": keys_sha256(keys),
        "teacher": {"fingerprint": None},
    }
    (folder / META).write_text(json.dumps(meta))


def _status_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def read_epoch(folder: str, variant: str) -> dict[str, float]:
    """Child process: read one shuffled epoch in batches; peak memory in MiB."""
    cache = TeacherCache(folder)
    order = torch.randperm(cache.num_samples, generator=torch.Generator().manual_seed(0))
    base = _status_kib()
    peak_anon = peak_file = 0
    whole = None
    if variant == "load-whole":
        raw = np.fromfile(Path(folder) / FEATURES, dtype=np.float16)
        whole = torch.from_numpy(raw.reshape(cache.num_samples, cache.dim))
    start = time.perf_counter()
    for i in range(0, cache.num_samples, BATCH):
        index = order[i : i + BATCH]
        rows = whole[index].float() if whole is not None else cache.rows(index)
        assert rows.shape == (index.numel(), cache.dim)
        if (i // BATCH) % 16 == 0:
            now = _status_kib()
            peak_anon = max(peak_anon, now["RssAnon"])
            peak_file = max(peak_file, now["RssFile"])
    seconds = time.perf_counter() - start
    now = _status_kib()
    return {
        "anon_mib": (max(peak_anon, now["RssAnon"]) - base["RssAnon"]) / 1024,
        "filebacked_mib": (max(peak_file, now["RssFile"]) - base["RssFile"]) / 1024,
        "vmhwm_mib": now["VmHWM"] / 1024,
        "rows_per_s": cache.num_samples / seconds,
    }


def memory(rows: int, dim: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"
        write_random_cache(folder, rows, dim)
        size_mib = (folder / FEATURES).stat().st_size / MIB
        for variant in ("memmap", "load-whole"):
            code = (
                "import json, sys; sys.path.insert(0, '.'); "
                "from benchmarks.distill_cache import read_epoch; "
                f"print(json.dumps(read_epoch({str(folder)!r}, {variant!r})))"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            results.append({"variant": variant, "size_mib": size_mib, **json.loads(out.stdout)})
    return results


def speed(steps: int) -> dict[str, float]:
    """Steps/s of a SimReg step with the teacher online and cached (same images)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "teacher.pt"
        torch.manual_seed(0)
        torch.save(build_backbone("resnet18_cifar").state_dict(), weights)
        spec = TeacherConfig(kind="backbone", arch="resnet18_cifar", path=str(weights))
        online = build_teacher(spec)
        n, batch = 512, 64
        images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        cache_dir = Path(tmp) / "cache"
        cache_dir.mkdir()
        feats = torch.cat([online(images[i : i + batch], None) for i in range(0, n, batch)])
        (cache_dir / FEATURES).write_bytes(feats.half().numpy().tobytes())
        keys = [str(i) for i in range(n)]
        (cache_dir / PATHS).write_text("\n".join(keys) + "\n")
        meta = {
            "num_samples": n,
            "dim": online.dim,
            "dtype": "float16",
            "paths_sha256": keys_sha256(keys),
            "teacher": {"fingerprint": online.fingerprint},
        }
        (cache_dir / META).write_text(json.dumps(meta))
        teacher = {"kind": "backbone", "arch": "resnet18_cifar", "path": str(weights)}
        rates: dict[str, list[float]] = {"online": [], "cached": []}
        models = {}
        for name, extra in (("online", {}), ("cached", {"cache": str(cache_dir)})):
            cfg = config_from_dict(
                {
                    "method": {"name": "simreg", "teachers": [{**teacher, **extra}]},
                    "model": {"backbone": "tiny_cnn", "projector": None, "predictor": None},
                    "data": {"dataset": "synthetic", "image_size": 32, "views": ["weak"]},
                }
            )
            models[name] = build_method(cfg)
        for _ in range(3):  # interleaved repeats: load changes hit both variants
            for name, model in models.items():
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                start = time.perf_counter()
                for step in range(steps):
                    index = torch.arange(step * batch, (step + 1) * batch) % n
                    loss, _ = model.compute_loss([images[index]], index, index)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                rates[name].append(steps / (time.perf_counter() - start))
        return {name: float(np.median(r)) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    full_gib = IMAGENET_ROWS * args.dim * 2 / (1 << 30)
    print(
        f"| variant | rows | file (MiB) | peak anon (MiB) | peak file-backed (MiB) | "
        f"rows/s | anon at 1.28 M x {args.dim} (GiB) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in memory(args.rows, args.dim):
        full = r["anon_mib"] / 1024 if r["variant"] == "memmap" else full_gib
        print(
            f"| {r['variant']} | {args.rows:,} | {r['size_mib']:.0f} | {r['anon_mib']:.1f} | "
            f"{r['filebacked_mib']:.0f} | {r['rows_per_s']:,.0f} | {full:.2f} |"
        )
    rates = speed(args.steps)
    print(
        f"\n| teacher | steps/s |\n|---|---:|\n| online | {rates['online']:.2f} |\n"
        f"| cached | {rates['cached']:.2f} |\n\ncached / online: "
        f"{rates['cached'] / rates['online']:.2f}x"
    )


if __name__ == "__main__":
    main()
