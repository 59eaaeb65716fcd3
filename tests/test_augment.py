"""View augmentations: parameters drawn from one seeded stream per view, with torchvision's
distributions; the batched (device) photometric part equals the per-image (worker) one; the
``data.augment_on`` switch, seeded and resumable exactly."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_config
from knn_probe import single_thread  # noqa: F401  (a fixture)
from omegaconf import OmegaConf
from PIL import Image, ImageFilter
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from ssl_lib.config import config_from_dict
from ssl_lib.data import SSLDataModule
from ssl_lib.data.augment import (
    NUM_PARAMS,
    SOLARIZE_THRESHOLD,
    SPECS,
    ViewDraw,
    crop_box,
    draw_view,
    geometric,
    normalize,
    photometric_batch,
    pil_as_tensor,
)
from ssl_lib.data.transforms import MultiView
from ssl_lib.schema import ConfigError
from ssl_lib.train import train

N = 3000
P_MIN = 1e-3  # a correct sampler fails one of these tests about once in a thousand runs


def _image(seed: int = 0, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A smooth random colour image (colour gradients plus noise), ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = rng.uniform(0, 255, 3) * (1 - xx[..., None]) + rng.uniform(0, 255, 3) * yy[..., None]
    noise = rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(500, 375), (40, 200)], ids=["imagenet", "narrow"])
@pytest.mark.parametrize("name", ["strong", "byol1"])
def test_crop_boxes_follow_torchvision_random_resized_crop(name, size):
    spec = SPECS[name]
    w, h = size
    rng = random.Random(1)
    ours = np.array([crop_box(rng, w, h, spec.scale, spec.ratio) for _ in range(N)], float)
    torch.manual_seed(1)
    img = torch.zeros(3, h, w)
    ref = np.array(
        [T.RandomResizedCrop.get_params(img, list(spec.scale), list(spec.ratio)) for _ in range(N)],
        float,
    )
    assert ((ours[:, 0] + ours[:, 2] <= h) & (ours[:, 1] + ours[:, 3] <= w)).all()
    for column in range(4):  # top, left, height, width
        assert stats.ks_2samp(ours[:, column], ref[:, column]).pvalue > P_MIN, column
    for stat in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2]):  # area, aspect
        assert stats.ks_2samp(stat(ours), stat(ref)).pvalue > P_MIN


@pytest.mark.parametrize("name", ["strong", "byol2"])
def test_photometric_parameters_follow_torchvision_and_the_papers(name):
    spec = SPECS[name]
    rng = random.Random(2)
    draws = [draw_view(spec, rng, 500, 375) for _ in range(N)]
    # Bernoulli draws at the papers' probabilities
    for flag, p in [
        ("flip", spec.flip_p),
        ("jitter", spec.jitter_p),
        ("gray", spec.gray_p),
        ("blur", spec.blur_p),
        ("solarize", spec.solarize_p),
    ]:
        hits = sum(getattr(d, flag) for d in draws)
        if p in (0.0, 1.0):
            assert hits == p * N, flag
        else:
            assert stats.binomtest(hits, N, p).pvalue > P_MIN, flag
    # jitter factors and order against torchvision's own ColorJitter.get_params
    b, c, s, h = spec.jitter
    torch.manual_seed(2)
    ref = [
        T.ColorJitter.get_params([max(0, 1 - b), 1 + b], [1 - c, 1 + c], [1 - s, 1 + s], [-h, h])
        for _ in range(N)
    ]
    jittered = [d for d in draws if d.jitter]
    for k in range(4):
        ours_k = [d.factors[k] for d in jittered]
        assert stats.ks_2samp(ours_k, [r[k + 1] for r in ref]).pvalue > P_MIN, k
    for position in range(4):  # which adjustment comes at each position: uniform, as torch's
        counts = np.bincount([d.order[position] for d in jittered], minlength=4)
        ref_counts = np.bincount([int(r[0][position]) for r in ref], minlength=4)
        assert stats.chi2_contingency([counts, ref_counts]).pvalue > P_MIN, position
    sigmas = [d.sigma for d in draws if d.blur]
    lo, hi = spec.blur_sigma
    assert stats.kstest(sigmas, stats.uniform(lo, hi - lo).cdf).pvalue > P_MIN


def test_small_images_have_no_blur():
    view = MultiView(["byol1"], 32, "device").transforms[0]
    assert view.spec.blur_p == 0.0 and SPECS["byol1"].blur_p == 1.0
    assert MultiView(["byol1"], 96, "device").transforms[0].spec.blur_p == 1.0


_PIL_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def photometric_pil(img: Image.Image, draw: ViewDraw) -> torch.Tensor:
    """Reference: the drawn photometric part on one PIL image with torchvision's functional ops
    (what the ``workers`` pipelines' ``ColorJitter`` / ``RandomGrayscale`` compute), PIL's
    ``GaussianBlur(radius=sigma)`` (MoCo v2 / lightly) and solarisation at 128."""
    if draw.jitter:
        for op in draw.order:
            img = _PIL_JITTER[op](img, draw.factors[op])
    if draw.gray:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if draw.blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=draw.sigma))
    if draw.solarize:
        img = F.solarize(img, SOLARIZE_THRESHOLD)
    return normalize(F.pil_to_tensor(img))


def _draw(**photometric) -> ViewDraw:
    return ViewDraw(box=(20, 30, 200, 260), flip=True, **photometric)


@pytest.mark.parametrize(
    ("photometric", "mean_tol", "max_tol"),
    [
        ({}, 0.0, 0.0),
        ({"jitter": True, "order": (3, 0, 2, 1), "factors": (1.3, 0.7, 1.2, 0.08)}, 3.0, 12.0),
        ({"jitter": True, "order": (1, 2, 3, 0), "factors": (0.6, 1.4, 0.6, -0.1)}, 1.5, 6.0),
        ({"gray": True}, 0.5, 1.0),
        ({"solarize": True}, 0.01, 0.01),
        ({"blur": True, "sigma": 1.5}, 1.0, 12.0),
        ({"blur": True, "sigma": 0.3}, 1.0, 12.0),
    ],
    ids=["none", "jitter", "jitter2", "gray", "solarize", "blur", "light-blur"],
)
def test_batched_photometric_equals_the_per_image_pipeline(photometric, mean_tol, max_tol):
    """Same crop and parameters: the device (kornia, float) and the worker (PIL, uint8) results
    agree within rounding (in grey levels of 255): PIL rounds to 8 bits after every op and
    shifts hue in 8-bit HSV; its blur is a box approximation of the Gaussian."""
    img, draw = _image(3), _draw(**photometric)
    crop = geometric(img, draw, 224)
    worker = photometric_pil(crop, draw)
    params = draw.photometric()[None]
    device = photometric_batch(
        torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None], params, SPECS["byol2"]
    )[0]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    diff = ((device - worker) * std).abs() * 255
    assert float(diff.mean()) <= mean_tol and float(diff.max()) <= max_tol, (
        float(diff.mean()),
        float(diff.max()),
    )


def test_tensor_crop_matches_the_pil_crop():
    img = _image(4)
    draw = _draw()
    pil = torch.from_numpy(np.array(geometric(img, draw, 96))).permute(2, 0, 1).int()
    tensor = geometric(pil_as_tensor(img), draw, 96)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 96, 96) and tensor.is_contiguous()
    assert (tensor.int() - pil).abs().max() <= 1


@pytest.mark.usefixtures("single_thread")  # batched HSV ops contend on a shared machine
def test_both_pipelines_give_the_same_output_statistics():
    """Independent draws through the worker pipelines (torchvision, lightly) and the device
    pipeline: per-view channel means and standard deviations have the same distributions
    (strong and byol2 views, 96 px)."""
    img = _image(5)
    for v, name in enumerate(["strong", "byol2"]):
        worker = MultiView([name], 96, "workers")
        device = MultiView([name], 96, "device")
        a = torch.stack([worker(img, [10_000 * v + i])[0] for i in range(200)])
        crops = [device(img, [20_000 * v + i])[0] for i in range(200)]
        batch = torch.utils.data.default_collate(crops)
        b = photometric_batch(batch["image"], batch["params"], device.transforms[0].spec)
        for stat in (lambda x: x.mean((2, 3)), lambda x: x.std((2, 3))):
            sa, sb = stat(a), stat(b)
            for channel in range(3):
                p = stats.ks_2samp(sa[:, channel], sb[:, channel]).pvalue
                assert p > P_MIN, (name, channel)


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_seeded_views_ignore_and_keep_the_global_generators(augment_on):
    img = _image(6, (64, 48))
    views = MultiView(["strong", "byol2"], 32, augment_on)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = views(img, [7, 8])
    assert torch.equal(states[0], torch.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    again = views(img, [7, 8])
    other = views(img, [7, 9])
    if augment_on == "device":  # the crops and the drawn photometric parameters
        first, again, other = (
            [torch.cat([v["image"].flatten(), v["params"]]) for v in views_]
            for views_ in (first, again, other)
        )
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


@pytest.mark.parametrize("names", [["strong", "weak"], ["byol1", "byol2"]])
def test_cheap_seeding_gives_the_views_of_full_reseeding(names):
    """Seeding only the generators a pipeline reads gives the views that re-seeding torch
    (``torch.manual_seed``), numpy and ``random`` gave."""
    img, views = _image(8, (120, 90)), MultiView(names, 96)
    seeds = [11, 12]
    cheap = views(img, seeds)
    with torch.random.fork_rng():
        state = np.random.get_state()
        full = []
        for t, seed in zip(views.transforms, seeds, strict=True):
            torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
            full.append(t(img))
        np.random.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(cheap, full, strict=True))


def test_unseeded_views_repeat_under_the_global_torch_seed():
    """Without a seed (evaluation loaders), a view draws from the global torch RNG, as
    torchvision's transforms do, so ``seed_everything`` makes a run repeatable."""
    img, probe = _image(7, (40, 40)), MultiView(["probe"], 32)
    torch.manual_seed(0)
    first = probe(img)[0]
    torch.manual_seed(0)
    assert torch.equal(first, probe(img)[0]) and not torch.equal(first, probe(img)[0])


def test_augment_on_is_checked():
    with pytest.raises(ConfigError, match="augment_on.*'gpu'.*workers"):
        config_from_dict(tiny_config(), ["data.augment_on=gpu"])


def test_device_batches_are_finished_by_the_data_module(make_config):
    cfg = make_config("byol", ["data.augment_on=device", "data.views=[strong,byol2]"])
    dm = SSLDataModule(cfg.data, seed=3)
    views, labels, index = next(iter(dm.train_dataloader()))
    assert views[0]["image"].dtype == torch.uint8 and views[1]["params"].shape == (16, NUM_PARAMS)
    finished, labels2, index2 = dm.on_after_batch_transfer((views, labels, index), 0)
    assert [v.shape for v in finished] == [(16, 3, 32, 32)] * 2
    assert finished[0].dtype == torch.float32 and torch.equal(index, index2)
    # the same samples as the worker pipeline, each view finished with its own parameters
    worker = SSLDataModule(OmegaConf.merge(cfg.data, {"augment_on": "workers"}), seed=3)
    ref, _, ref_index = next(iter(worker.train_dataloader()))
    assert torch.equal(index, ref_index)
    for view, done in zip(views, finished, strict=True):
        assert torch.equal(done, photometric_batch(view["image"], view["params"], SPECS["strong"]))
    assert abs(float(finished[0].mean() - ref[0].mean())) < 0.2
    # finished batches pass unchanged
    assert dm.on_after_batch_transfer((ref, labels, index), 0)[0] is ref


class KeepStep2(pl.Callback):
    """Copies last.ckpt as written after global step 2 (mid-epoch: step 2 of 4)."""

    def __init__(self, ckpt: Path, into: Path) -> None:
        self.ckpt, self.into = ckpt, into

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:
            shutil.copy(self.ckpt, self.into)


def test_device_augmentation_resumes_exactly(tmp_path):
    common = [
        "data.augment_on=device",
        "trainer.checkpoint_every_n_steps=2",
        f"run.output_dir={tmp_path}",
    ]
    kept = tmp_path / "step2.ckpt"
    cfg = config_from_dict(tiny_config("byol"), [*common, "run.name=ref"])
    ref_dir = train(
        cfg, callbacks=[KeepStep2(tmp_path / "ref" / "checkpoints" / "last.ckpt", kept)]
    )
    resumed = config_from_dict(tiny_config("byol"), [*common, "run.name=resumed"])
    res_dir = train(resumed, resume_from=kept)
    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(res_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert torch.load(kept, weights_only=False)["global_step"] == 2
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
