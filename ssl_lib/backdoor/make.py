"""``ssl-lib poison make``: lossless poisoned copies, file lists and the manifest.

Everything is checked and every box drawn before a file is written; the output is written to a
hidden folder beside ``output`` and renamed into place at the end, so a failed run leaves
nothing behind. Same recipe and seed, same manifest, byte for byte (it holds no time stamp and
no output path).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ssl_lib import console
from ssl_lib.backdoor.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME
from ssl_lib.backdoor.poison import (
    TRAIN_STREAM,
    VAL_STREAM,
    image_rng,
    rates,
    resolve_target,
    select_poisoned,
)
from ssl_lib.backdoor.triggers import build_trigger, does_not_fit, draw_box, paste, trigger_sha256
from ssl_lib.config import ConfigError
from ssl_lib.data.datasets import DataError, ImageList, image_folder, load_rgb
from ssl_lib.data.transforms import eval_geometry
from ssl_lib.files import atomic_write_text, unused_path

TRAIN_LIST, VAL_LIST, TRIGGER_PNG = "train.txt", "val_patched.txt", "trigger.png"


def _copy_name(source: str) -> str:
    """The PNG name of a copy: the source's relative path, ``.png`` appended unless it is one
    (lossless; a copy never collides with another)."""
    return source if source.lower().endswith(".png") else source + ".png"


def _relative(ds: ImageList, root: str) -> list[str]:
    return [os.path.relpath(path, root) for path, _ in ds.samples]


def _train_boxes(ds: ImageList, poisoned: list[int], trigger, spec) -> dict[int, list[int]]:
    boxes = {}
    for index in poisoned:
        path = ds.samples[index][0]
        try:
            with Image.open(path) as img:  # the header only
                size = img.size
        except OSError as err:
            raise DataError(f"cannot read image '{path}': {err}") from None
        box = draw_box(
            size, trigger.shape, spec.train_band, image_rng(spec.seed, TRAIN_STREAM, index)
        )
        if box is None:
            raise DataError(
                does_not_fit(
                    f"training image '{path}'", size, trigger, spec.train_band, "poison.train_band"
                )
            )
        boxes[index] = list(box)
    return boxes


def _val_boxes(count: int, size: int, trigger, spec) -> list[list[int]]:
    boxes = []
    for index in range(count):
        box = draw_box(
            (size, size), trigger.shape, spec.val_band, image_rng(spec.seed, VAL_STREAM, index)
        )
        if box is None:
            raise DataError(
                does_not_fit(
                    "the validation images", (size, size), trigger, spec.val_band, "poison.val_band"
                )
            )
        boxes.append(list(box))
    return boxes


def make_poison(cfg: DictConfig, progress: bool = True) -> tuple[Path, dict]:
    """Write the poisoned data set of a ``poison make`` config; returns its folder and the
    manifest (a dict, as written to ``manifest.json``).

    Raises :class:`ConfigError` / :class:`DataError` (one line, nothing written) for a missing
    ``data.train_root``, unusable folders, class folders that differ between train and val, a
    target that is not a class, an unreadable trigger image, or a trigger that does not fit
    into a poisoned image's band.
    """
    d, spec = cfg.data, cfg.poison
    if d.train_root is None:
        raise ConfigError("data.train_root must name the training folder to poison")
    train = image_folder(d.train_root, max_image_pixels=d.max_image_pixels)
    val = image_folder(d.val_root, max_image_pixels=d.max_image_pixels) if d.val_root else None
    if val is not None and val.classes != train.classes:
        raise DataError(
            f"class folders differ between data.train_root '{d.train_root}' and data.val_root "
            f"'{d.val_root}'"
        )
    trigger = build_trigger(spec.trigger)
    target = resolve_target(spec.target if spec.targeted else None, train.classes)
    poisoned, num_candidates = select_poisoned(train.targets, target, spec.rate, spec.seed)
    train_boxes = _train_boxes(train, poisoned, trigger, spec)
    val_boxes = _val_boxes(len(val), d.image_size, trigger, spec) if val is not None else []

    train_root, val_root = Path(d.train_root).resolve(), Path(d.val_root).resolve() if val else None
    out = unused_path(Path(cfg.output), keep_suffix=False).resolve()
    train_records = [
        {
            "path": "train/" + _copy_name(src) if i in train_boxes else src,
            "source": src,
            "label": label,
            "poisoned": i in train_boxes,
            "box": train_boxes.get(i),
        }
        for i, (src, label) in enumerate(
            zip(_relative(train, d.train_root), train.targets, strict=True)
        )
    ]
    val_records = [
        {
            "path": "val/" + _copy_name(src),
            "source": src,
            "label": label,
            "poisoned": True,
            "box": box,
        }
        for src, label, box in zip(
            _relative(val, d.val_root) if val else [],
            val.targets if val else [],
            val_boxes,
            strict=True,
        )
    ]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": spec.seed,
        "classes": list(train.classes),
        "attack": {
            "targeted": bool(spec.targeted),
            "target": None if target is None else {"label": target, "name": train.classes[target]},
            "rate": rates(len(poisoned), num_candidates, len(train), spec.rate),
        },
        "trigger": {
            **OmegaConf.to_container(spec.trigger),
            "image": spec.trigger.image and str(Path(spec.trigger.image).resolve()),
            "height": int(trigger.shape[0]),
            "sha256": trigger_sha256(trigger),
        },
        "placement": {
            "train_band": list(spec.train_band),
            "val_band": list(spec.val_band),
            "val_image_size": d.image_size,
        },
        "roots": {"train": str(train_root), "val": None if val_root is None else str(val_root)},
        "train": train_records,
        "val": val_records,
    }

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _write(tmp, out, manifest, train, val, trigger, spec, d.image_size, progress)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, manifest


def _write(tmp, out, manifest, train, val, trigger, spec, size, progress) -> None:
    tmp.mkdir(parents=True)
    Image.fromarray(trigger).save(tmp / TRIGGER_PNG)
    opacity = spec.trigger.opacity
    poisoned = [(i, r) for i, r in enumerate(manifest["train"]) if r["poisoned"]]
    for i, record in console.progress(poisoned, "poisoned train copies", progress):
        img = load_rgb(train.samples[i][0], train.max_image_pixels)
        _save_png(paste(img, trigger, tuple(record["box"]), opacity), tmp / record["path"])
    geometry = eval_geometry(size)
    for j, record in console.progress(list(enumerate(manifest["val"])), "patched val", progress):
        img = geometry(load_rgb(val.samples[j][0], val.max_image_pixels))
        _save_png(paste(img, trigger, tuple(record["box"]), opacity), tmp / record["path"])
    roots = {"train": Path(manifest["roots"]["train"]), "val": manifest["roots"]["val"]}
    lines = [
        f"{out / r['path'] if r['poisoned'] else roots['train'] / r['path']} {r['label']}"
        for r in manifest["train"]
    ]
    atomic_write_text(tmp / TRAIN_LIST, "\n".join(lines) + "\n")
    if manifest["val"]:
        lines = [f"{out / r['path']} {r['label']}" for r in manifest["val"]]
        atomic_write_text(tmp / VAL_LIST, "\n".join(lines) + "\n")
    atomic_write_text(tmp / MANIFEST_NAME, manifest_text(manifest))


def manifest_text(manifest: dict) -> str:
    """The manifest as JSON: the settings indented, then one line per image record."""
    head = json.dumps({k: v for k, v in manifest.items() if k not in ("train", "val")}, indent=1)
    splits = [
        f' "{split}": [\n' + ",\n".join("  " + json.dumps(r) for r in manifest[split]) + "\n ]"
        for split in ("train", "val")
    ]
    return head[: -len("\n}")] + ",\n" + ",\n".join(splits) + "\n}\n"


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
