"""An NVIDIA DALI training loader (``data.loader: dali``; ``pip install ssl_lib[dali]``).

DALI decodes the image files (nvJPEG on a GPU, libjpeg-turbo on the CPU) and runs the geometric
part of each view (region-of-interest decoding of the crop, antialiased bilinear resize, flip)
into uint8; the photometric part then runs batched on the training device exactly as with
``data.augment_on: device`` (:meth:`~ssl_lib.data.module.SSLDataModule.on_after_batch_transfer`,
:func:`~ssl_lib.data.augment.photometric_batch`).

The views are the same as ``device`` mode's by construction: every random parameter (crop box,
flip, photometric parameters) is drawn here by :func:`~ssl_lib.data.augment.draw_view` from the
sample's seed ``(run seed, epoch, index, view)``, in the order of the
:class:`~ssl_lib.data.sampling.EpochSampler`, and handed to DALI as inputs. DALI's file readers
and random operators are not used: their order and seeds are DALI's own and their position
cannot be saved, whereas this way a resumed run sees the same batches and, DALI's decoders and
resize being deterministic, the same pixels.

The pipeline runs one batch at a time in the training process (decoding spread over
``data.num_workers`` DALI threads); it does not yet prefetch the next batch while a step runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Subset

from ssl_lib.data.augment import SPECS, draw_view, spec_for_size
from ssl_lib.data.datasets import DataError, ImageList, IndexedDataset, _pil_pixel_check_off
from ssl_lib.data.sampling import VIEW_STREAM, EpochSampler, mix_seed, restore_position

__all__ = ["DALI_MISSING", "DaliLoader", "dali_available"]

DALI_MISSING = (
    "needs NVIDIA DALI, which is not installed: pip install ssl_lib[dali] "
    "(or nvidia-dali-cuda120), or use data.loader=torch"
)


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _files(base) -> tuple[list[str], list[int]]:
    """Path and label of every item of an :class:`ImageList` or of a ``Subset`` of one."""
    if isinstance(base, Subset):
        paths, labels = _files(base.dataset)
        return [paths[i] for i in base.indices], [labels[i] for i in base.indices]
    if not isinstance(base, ImageList):
        raise DataError(
            "data.loader=dali reads image files: use data.dataset=image_folder or file_list"
        )
    return [p for p, _ in base.samples], [int(y) for _, y in base.samples]


def _image_size(path: str, max_pixels: int | None) -> tuple[int, int]:
    """``(width, height)`` from the file's header (no decoding).

    Raises :class:`DataError` for a file PIL cannot identify, or with more than ``max_pixels``
    pixels (``data.max_image_pixels``, as the torch loader refuses it).
    """
    try:
        with _pil_pixel_check_off(), Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image '{path}': {err}") from None
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(
            f"image '{path}' has {width} x {height} pixels, more than "
            f"data.max_image_pixels={max_pixels}"
        )
    return width, height


class DaliLoader:
    """Batches ``(views, labels, indices)`` of an image-file training set, made by DALI.

    ``views``: one ``{"image": uint8 (B, 3, size, size), "params": float32 (B, NUM_PARAMS)}``
    per name in ``views`` (what ``data.augment_on: device`` loader workers send), on the CUDA
    device ``device_id`` (``None``: on the CPU, with DALI's CPU decoder); ``labels`` and
    ``indices``: int64 ``(B,)``. A file with more than ``max_image_pixels`` pixels raises
    :class:`DataError` naming it. Iterates the ``sampler``'s keys in batches of ``batch_size``;
    like :class:`~ssl_lib.data.sampling.ResumableDataLoader` it saves and restores its position
    (``state_dict`` / ``load_state_dict``) and ``len()`` is the full epoch.

    Raises :class:`DataError` for a dataset that is not made of image files.
    """

    def __init__(
        self,
        dataset: IndexedDataset,
        sampler: EpochSampler,
        position: Callable[[], dict[str, Any]],
        views: list[str],
        size: int,
        batch_size: int,
        num_threads: int = 1,
        device_id: int | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        self.paths, self.labels = _files(dataset.base)
        self.seed = dataset.seed
        self.sampler = sampler
        self.position = position
        self.specs = [spec_for_size(SPECS[name], size) for name in views]
        self.size = size
        self.batch_size = batch_size
        self.num_threads = max(1, num_threads)
        self.device_id = device_id
        self.max_image_pixels = max_image_pixels
        self._pipe = None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The data position (Lightning stores it with the fit loop)."""
        return self.position()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after a saved position."""
        restore_position(self.sampler, state)

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        # One batch per run(), fed by ssl_lib: no prefetching of inputs that are not yet known.
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        decoder = "cpu" if self.device_id is None else "mixed"
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            outputs = []
            for v in range(len(self.specs)):
                anchor = fn.external_source(name=f"anchor{v}", dtype=types.FLOAT)
                shape = fn.external_source(name=f"shape{v}", dtype=types.FLOAT)
                flip = fn.external_source(name=f"flip{v}", dtype=types.INT32)
                # anchor / shape in pixels, (x, y) / (width, height); EXIF orientation is
                # ignored, as PIL's decoding in the other loaders ignores it
                img = fn.decoders.image_slice(
                    encoded,
                    anchor,
                    shape,
                    device=decoder,
                    output_type=types.RGB,
                    normalized_anchor=False,
                    normalized_shape=False,
                    adjust_orientation=False,
                )
                img = fn.resize(
                    img,
                    resize_x=self.size,
                    resize_y=self.size,
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                )
                img = fn.flip(img, horizontal=flip)
                outputs.append(fn.transpose(img, perm=[2, 0, 1]))
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _batch(self, keys: list[tuple[int, int]]) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self._pipe is None:
            self._pipe = self._build()
        indices = [index for _, index in keys]
        sizes = [_image_size(self.paths[i], self.max_image_pixels) for i in indices]
        self._pipe.feed_input("encoded", [np.fromfile(self.paths[i], np.uint8) for i in indices])
        params = []
        for v, spec in enumerate(self.specs):
            draws = [
                draw_view(spec, random.Random(mix_seed(self.seed, VIEW_STREAM, e, i, v)), w, h)
                for (e, i), (w, h) in zip(keys, sizes, strict=True)
            ]
            boxes = [d.box for d in draws]  # (top, left, height, width)
            self._pipe.feed_input(f"anchor{v}", [np.float32([b[1], b[0]]) for b in boxes])
            self._pipe.feed_input(f"shape{v}", [np.float32([b[3], b[2]]) for b in boxes])
            self._pipe.feed_input(f"flip{v}", [np.int32(d.flip) for d in draws])
            params.append(torch.stack([d.photometric() for d in draws]))
        device = torch.device("cpu" if self.device_id is None else f"cuda:{self.device_id}")
        stream = None if self.device_id is None else torch.cuda.current_stream(device)
        views = []
        for out, p in zip(self._pipe.run(), params, strict=True):
            tensor = out.as_tensor()
            image = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
            feed_ndarray(tensor, image, cuda_stream=stream)
            views.append({"image": image, "params": p})
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.int64)
        return views, labels, torch.tensor(indices, dtype=torch.int64)

    def __iter__(self) -> Iterator[tuple[list[dict], torch.Tensor, torch.Tensor]]:
        keys = list(self.sampler)
        for start in range(0, len(keys), self.batch_size):
            yield self._batch(keys[start : start + self.batch_size])
