"""PatchSearch (``ssl-lib defend patchsearch|filter``): scores, search, Grad-CAM, metrics, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from ssl_lib.backdoor.config import load_poison_config
from ssl_lib.backdoor.evaluate import load_probe
from ssl_lib.backdoor.make import TRAIN_LIST, make_poison
from ssl_lib.backdoor.manifest import load_manifest
from ssl_lib.config import ConfigError, config_from_dict
from ssl_lib.data.datasets import DataError
from ssl_lib.defend.filter import file_list_lines
from ssl_lib.defend.gradcam import PseudoClassifier, cam_layer, grad_cam, salient_window
from ssl_lib.defend.patchsearch import (
    detection_metrics,
    iterative_search,
    open_data,
    paste,
    poison_scores,
    poison_truth,
    predict,
    prune_count,
)
from ssl_lib.methods import build_method
from ssl_lib.models import build_backbone

TINY = [
    "model.backbone=tiny_cnn",
    "model.projector.hidden_dim=32",
    "model.projector.out_dim=16",
    "model.predictor.hidden_dim=32",
    "model.predictor.out_dim=16",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (as in CI's workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BrightSquare(nn.Module):
    """Feature (1, 0) for an image without a bright 4 x 4 square in channel 0, else (0, 1)."""

    def forward(self, x):
        bright = (nn.functional.avg_pool2d(x[:, :1], 4, stride=1).amax((1, 2, 3)) > 0.9).float()
        return torch.stack([1 - bright, bright], dim=1) * 7.0  # scale: features get normalised


def test_planted_patch_score_counts_moves_into_its_cluster():
    classifier = PseudoClassifier(BrightSquare(), torch.eye(2))
    tests = torch.rand(6, 3, 16, 16) * 0.5
    tests[5, 0, :4, :4] = 1.0  # already in cluster 1 before any patch
    clean = predict(classifier, tests, 4)
    assert clean.tolist() == [0, 0, 0, 0, 0, 1]
    bright, dark = torch.ones(3, 4, 4), torch.zeros(3, 4, 4)
    patches = torch.stack([bright, dark, dark])
    corners = torch.full((3, 6, 2), 10)  # away from image 5's own square
    clusters = torch.tensor([1, 1, 0])
    scores = poison_scores(classifier, tests, clean, patches, corners, clusters, batch_size=5)
    # bright -> cluster 1: 6 there after pasting, 1 before; dark patches move nothing
    assert scores.tolist() == [5, 0, 0]


def test_batched_scores_equal_the_one_forward_per_paste_loop():
    torch.manual_seed(0)
    backbone = build_backbone("tiny_cnn").eval()
    tests, patches = torch.randn(5, 3, 32, 32), torch.randn(3, 3, 12, 12) * 4
    corners = torch.randint(0, 21, (3, 5, 2))
    # centroids: two clean images and two patched ones, so that pasting moves some images
    anchors = torch.cat([tests[:2], paste(tests[2:4], patches[:2], corners[:2, 0])])
    with torch.no_grad():
        classifier = PseudoClassifier(backbone, backbone(anchors)).eval()
    clusters = torch.tensor([0, 2, 3])
    clean = predict(classifier, tests, 2)
    batched = poison_scores(classifier, tests, clean, patches, corners, clusters, batch_size=7)
    expected = []  # the authors' loop: one pasted image per forward pass
    with torch.no_grad():
        for i in range(3):
            moved = 0
            for j in range(5):
                y, x = corners[i, j].tolist()
                img = tests[j].clone()
                img[:, y : y + 12, x : x + 12] = patches[i]
                moved += int(classifier(img[None]).argmax(1).item() == clusters[i].item())
            expected.append(moved - int((clean == clusters[i]).sum()))
    assert batched.tolist() == expected
    assert any(expected)  # the random patches do move images, so the test can fail
    assert torch.equal(
        batched, poison_scores(classifier, tests, clean, patches, corners, clusters, 1)
    )


def test_paste_puts_each_patch_at_its_corner():
    out = paste(torch.zeros(2, 1, 5, 5), torch.ones(2, 1, 2, 2), torch.tensor([[0, 0], [3, 1]]))
    assert out[0, 0, :2, :2].sum() == 4 and out[0].sum() == 4
    assert out[1, 0, 3:5, 1:3].sum() == 4 and out[1].sum() == 4


def test_pruning_drops_at_least_one_cluster_per_round():
    assert [prune_count(n, 0.25) for n in (8, 5, 3, 1)] == [2, 1, 1, 1]
    assign = torch.arange(5).repeat_interleave(4)  # 5 clusters of 4 images
    gen = torch.Generator().manual_seed(0)
    scores, rounds = iterative_search(assign, lambda idx: assign[idx].double(), 2, 0.25, gen)
    # int(3 * 0.25) = 0 would end the search with 3 clusters left; here it runs to the last one
    assert [(r.clusters, r.scored) for r in rounds] == [(5, 10), (4, 8), (3, 0), (2, 0), (1, 0)]
    assert scores[assign == 0].isnan().sum() == 2  # dropped after one round: 2 of 4 scored
    assert not scores[assign > 0].isnan().any()


def test_salient_window_matches_brute_force():
    torch.manual_seed(1)
    cams = torch.rand(3, 12, 10)
    corners = salient_window(cams, 5)
    for b in range(3):
        sums = torch.tensor(
            [[cams[b, y : y + 5, x : x + 5].sum() for x in range(6)] for y in range(8)]
        )
        flat = int(sums.argmax())
        assert corners[b].tolist() == [flat // 6, flat % 6]
    with pytest.raises(ValueError, match="window 13 does not fit"):
        salient_window(cams, 13)


def test_precision_recall_and_auroc_by_hand():
    scores = torch.tensor([5.0, 4.0, float("nan"), 3.0, -1.0, 2.0])
    poisoned = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    m = detection_metrics(scores, poisoned, ks=(5, 10))
    # ranking 0, 1, 3, 5, 4, 2 -> poisons at ranks 1, 3, 6; k = 10 is capped at 6
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@5"] == pytest.approx(2 / 3)
    assert m["precision@6"] == pytest.approx(3 / 6) and m["recall@6"] == 1.0
    # the never-scored image ranks last, even below a negative score: positives 5, 3, NaN vs
    # negatives 4, -1, 2 -> 5 of 9 pairs
    assert m["auroc"] == pytest.approx(5 / 9)


def test_grad_cam_on_a_cnn_and_on_a_vit_against_a_direct_computation():
    torch.manual_seed(0)
    cnn = build_backbone("tiny_cnn").eval()
    cams, top = grad_cam(
        PseudoClassifier(cnn, torch.randn(3, cnn.feat_dim)), torch.randn(2, 3, 32, 32), 32
    )
    assert cams.shape == (2, 32, 32) and top.shape == (2,) and (cams >= 0).all()

    timm = pytest.importorskip("timm")
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
    ).eval()
    centroids = torch.randn(3, 32)
    classifier = PseudoClassifier(vit, centroids)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the cluster logits are what the forward returns (not vit's head)
        cosine = nn.functional.normalize(vit(images)) @ nn.functional.normalize(centroids).T
        torch.testing.assert_close(classifier(images), cosine)
    norm1 = vit.blocks[-1].norm1
    cams, top = grad_cam(classifier, images, 32)
    assert vit.blocks[-1].norm1 is norm1  # the token-grid adapter is removed again
    # Grad-CAM by hand: channel weights = mean gradient over the 4 x 4 patch tokens
    seen = {}
    handle = norm1.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    logits = classifier(images)
    handle.remove()
    grads = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), seen["a"])[0][:, 1:]
    tokens = seen["a"][:, 1:]  # without the class token
    direct = torch.relu((grads.mean(1, keepdim=True) * tokens).sum(2)).reshape(2, 1, 4, 4)
    direct = nn.functional.interpolate(direct, (32, 32), mode="bilinear")[:, 0]
    assert cams.shape == (2, 32, 32) and direct.abs().sum() > 0
    torch.testing.assert_close(cams, direct.detach(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="not a multiple of the ViT's patch size 8"):
        with cam_layer(vit, 36):
            pass


# ------------------------------------------------------------------- the commands
def save_checkpoint(path, data: dict) -> None:
    torch.manual_seed(0)
    cfg = config_from_dict({"method": {"name": "byol"}, "data": data}, TINY)
    method = build_method(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": method.hparams, "state_dict": method.state_dict()}, path)


@pytest.fixture
def poisoned_folder(tmp_path, cifar10_root):
    """40 CIFAR-10 training images in 2 classes; ``ssl-lib poison make`` puts a 10 px trigger
    on 8 of the 20 ships and on 8 test images. Returns the clean training folder and the
    poison output folder (the test images are in ``val`` beside ``data``)."""
    root = tmp_path / "data"
    for split, folder, count in (("train", root, 20), ("test", tmp_path / "val", 4)):
        for cls in ("cat", "ship"):
            (folder / cls).mkdir(parents=True)
            for i in range(count):
                image = Image.open(cifar10_root / split / cls / f"{i:04d}.jpg").convert("RGB")
                image.save(folder / cls / f"{i:04d}.png")
    cfg = load_poison_config(
        "poison/cifar10_targeted",
        [
            f"data.train_root={root}",
            f"data.val_root={tmp_path / 'val'}",
            "poison.trigger.width=10",
            "poison.target=ship",
            "poison.rate=0.4",
            f"output={tmp_path / 'poisoned'}",
        ],
    )
    out, manifest = make_poison(cfg, progress=False)
    assert manifest["attack"]["rate"]["num_poisoned"] == 8
    return root, out


def poisoned_list(root, out) -> dict:
    """The data section of a model trained on the poisoned list of ``poison make``."""
    return {
        "dataset": "file_list",
        "root": str(root),
        "file_list": str(out / TRAIN_LIST),
        "image_size": 32,
    }


SEARCH = [
    "patchsearch.num_clusters=4",
    "patchsearch.batch_size=64",
    "patchsearch.top_patches=10",
    "data.num_workers=0",
    "data.batch_size=40",
]
FILTER = [
    "filter.ensemble=2",
    "filter.iterations=6",
    "filter.eval_every=3",
    "filter.patience=2",
    "filter.batch_size=8",
    "filter.val_size=4",
    "filter.topk_patches=4",
]


def test_patchsearch_and_filter_commands_on_a_planted_set(tmp_path, poisoned_folder, capsys):
    root, poisoned = poisoned_folder
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    save_checkpoint(ckpt, poisoned_list(root, poisoned))
    recipe = "defend/cifar10_patchsearch"
    assert (
        run_main("defend", "patchsearch", str(ckpt), recipe, f"manifest={poisoned}", *SEARCH) == 0
    )
    out = tmp_path / "run" / "defend" / "patchsearch_last"
    assert f"results:      {out}" in capsys.readouterr().out
    scores = np.load(out / "scores.npy")
    record = json.loads((out / "patchsearch.json").read_text())
    assert scores.shape == (40,) and record["num_scored"] == int((~np.isnan(scores)).sum())
    lines = (out / "ranking.txt").read_text().splitlines()
    assert len(lines) == 40 and float(lines[0].split()[1]) == np.nanmax(scores)
    assert np.load(out / "top_patches.npy").shape == (10, 9, 9, 3)  # 60 px at 224 -> 9 px at 32
    assert Image.open(out / "top_patches.png").size[0] > 9
    records = {r.path: r for r in load_manifest(poisoned).train}  # absolute paths
    assert sum(r.poisoned for r in records.values()) == 8

    def record_of(line: str):
        path = Path(line.split()[0])
        return records[str(path if path.is_absolute() else root / path)]

    ranked = [record_of(line).poisoned for line in lines]
    assert record["metrics"]["precision@5"] == pytest.approx(sum(ranked[:5]) / 5)
    assert record["metrics"]["recall@20"] == pytest.approx(sum(ranked[:20]) / 8)

    assert run_main("defend", "filter", str(out), recipe, *FILTER, "data.num_workers=0") == 0
    kept = (out / "filter" / "filtered.txt").read_text().splitlines()
    removed = (out / "filter" / "removed.txt").read_text().splitlines()
    assert len(kept) + len(removed) == 40
    assert {line.split()[0] for line in kept}.isdisjoint(line.split()[0] for line in removed)
    assert all(int(line.split()[1]) == record_of(line).label for line in kept + removed)
    metrics = json.loads((out / "filter" / "filter.json").read_text())["metrics"]
    found = sum(record_of(line).poisoned for line in removed)
    assert metrics["recall"] == pytest.approx(found / 8)
    assert metrics["precision"] == (pytest.approx(found / len(removed)) if removed else None)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, poisoned_folder, capsys):
    root, poisoned = poisoned_folder
    synthetic = tmp_path / "synth" / "checkpoints" / "last.ckpt"
    save_checkpoint(synthetic, {"dataset": "synthetic", "image_size": 32})
    folder = tmp_path / "folder" / "checkpoints" / "last.ckpt"
    save_checkpoint(folder, {"dataset": "image_folder", "root": str(root), "image_size": 32})
    on_the_fly = tmp_path / "fly" / "checkpoints" / "last.ckpt"
    data = {"dataset": "image_folder", "root": str(root), "image_size": 32}
    save_checkpoint(on_the_fly, {**data, "poison": {"target": "ship"}})
    cases = [
        (synthetic, [], "was trained on data.dataset=synthetic, which has no image files"),
        (folder, ["data.image_size=224"], "data.image_size=224, but checkpoint"),
        (folder, ["patchsearch.window=300"], "gives a 43-px window, larger than the 32-px images"),
        (folder, [f"manifest={poisoned}", *SEARCH], "is the clean original of a poisoned image"),
        (on_the_fly, [], "was trained on images poisoned on the fly (data.poison)"),
    ]
    for ckpt, extra, message in cases:
        code = run_main("defend", "patchsearch", str(ckpt), "defend/patchsearch", *extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (ckpt.parent.parent / "defend").exists()


def test_ground_truth_comes_from_the_poison_manifest(tmp_path, poisoned_folder):
    root, poisoned = poisoned_folder
    cfg = OmegaConf.create({"max_image_pixels": None})
    data = open_data("file_list", str(root), str(poisoned / TRAIN_LIST), 32, cfg)
    truth = poison_truth(data, str(poisoned))
    expected = [r.poisoned for r in load_manifest(poisoned).train]  # the list's order
    assert truth.tolist() == expected and int(truth.sum()) == 8
    assert poison_truth(data, str(poisoned / "manifest.json")).tolist() == expected
    with pytest.raises(DataError, match="poison manifest '.*nowhere.*' does not exist"):
        poison_truth(data, str(tmp_path / "nowhere"))
    odd = tmp_path / "odd"
    for cls in ("cat", "dog"):
        (odd / cls).mkdir(parents=True)
    with pytest.raises(DataError, match="does not match the train folder .* class folders differ"):
        poison_truth(open_data("file_list", str(odd), data.file_list, 32, cfg), str(poisoned))
    no_val = load_poison_config(
        "poison/cifar10_targeted",
        [f"data.train_root={root}", "data.val_root=null", f"output={tmp_path / 'no_val'}"],
    )
    assert load_manifest(make_poison(no_val, progress=False)[0]).val == []
    (root / "cat" / "extra.png").write_bytes((root / "cat" / "0000.png").read_bytes())
    whole = open_data("image_folder", str(root), None, 32, cfg)
    with pytest.raises(DataError, match="no record for image '.*extra.png'.*other images"):
        poison_truth(whole, str(poisoned))


def test_filter_lists_keep_paths_under_a_linked_data_root(tmp_path):
    (tmp_path / "real").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "real" / "a.png")
    (tmp_path / "links" / "cat").mkdir(parents=True)
    (tmp_path / "links" / "cat" / "a.png").symlink_to(tmp_path / "real" / "a.png")
    cfg = OmegaConf.create({"max_image_pixels": None})
    data = open_data("image_folder", str(tmp_path / "links"), None, 8, cfg)
    assert file_list_lines(data, [0]) == "cat/a.png 0\n"  # not the link's target


def test_chain_from_poison_make_to_a_filtered_list(tmp_path, poisoned_folder, capsys):
    """poison make -> train on its list -> eval backdoor -> patchsearch -> filter, 40 images."""
    root, poisoned = poisoned_folder
    data = poisoned_list(root, poisoned)
    train = [f"data.{k}={v}" for k, v in data.items()] + [
        "data.batch_size=20",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "monitor.knn_every_n_epochs=0",
        "monitor.online_linear=false",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=poisoned",
        *TINY,
    ]
    assert run_main("--quiet", "train", "demo/byol", *train) == 0
    ckpt = tmp_path / "runs" / "poisoned" / "checkpoints" / "last.ckpt"
    evaluation = [
        "eval/cifar10_linear_cached",
        "data.dataset=image_folder",
        f"data.train_root={root}",
        f"data.val_root={tmp_path / 'val'}",
        "data.num_workers=0",
        "features.progress_bar=false",
        f"backdoor.manifest={poisoned}",
        "linear.epochs=2",
        "linear.lr_grid=[0.1]",
    ]
    assert run_main("eval", "backdoor", str(ckpt), *evaluation) == 0
    assert "ASR %" in capsys.readouterr().out
    probe = tmp_path / "runs" / "poisoned" / "eval" / "backdoor_last"
    assert load_probe(probe, ["cat", "ship"], "backbone").fc.out_features == 2
    assert (
        run_main(
            "defend",
            "patchsearch",
            str(ckpt),
            "defend/cifar10_patchsearch",
            f"manifest={poisoned}",
            *SEARCH,
        )
        == 0
    )
    search = tmp_path / "runs" / "poisoned" / "defend" / "patchsearch_last"
    metrics = json.loads((search / "patchsearch.json").read_text())["metrics"]
    assert metrics["num_poisoned"] == 8
    assert run_main("defend", "filter", str(search), "defend/cifar10_patchsearch", *FILTER) == 0
    filtered = search / "filter" / "filtered.txt"
    retrain = [a for a in train if not a.startswith(("data.file_list", "run.name"))]
    retrain += [f"data.file_list={filtered}", "run.name=filtered"]
    assert run_main("--quiet", "train", "demo/byol", *retrain) == 0
    assert (tmp_path / "runs" / "filtered" / "checkpoints" / "last.ckpt").is_file()
