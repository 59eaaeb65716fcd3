"""Cluster alignment (``ssl-lib eval cluster``): the matching against a brute-force search, the
whole metric on separable features, the command on real files, and bad input."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
import torch
from PIL import Image
from test_eval_cli import one_line_error, run_main, save_random_init

from ssl_lib.eval.cluster import (
    aligned_accuracy,
    aligned_order,
    alignment_scores,
    cluster_alignment,
    contingency,
    match_clusters,
)
from ssl_lib.memory.kmeans import kmeans_fit, nearest_centroid


def brute_force(scores: torch.Tensor) -> float:
    """Largest summed score over every one-to-one map between clusters and classes."""
    k, c = scores.shape
    if k <= c:
        maps = (
            list(zip(range(k), cols, strict=True)) for cols in itertools.permutations(range(c), k)
        )
    else:
        maps = (
            list(zip(rows, range(c), strict=True)) for rows in itertools.permutations(range(k), c)
        )
    return max(sum(float(scores[i, j]) for i, j in pairs) for pairs in maps)


@pytest.mark.parametrize("k, c", [(2, 2), (3, 3), (4, 4), (5, 5), (4, 3), (3, 5)])
def test_matching_is_the_best_one_to_one_map(k, c):
    gen = torch.Generator().manual_seed(10 * k + c)
    for trial in range(20):
        n = 30
        ids = torch.randint(0, k, (n,), generator=gen)
        labels = torch.randint(0, c, (n,), generator=gen)
        counts = contingency(ids, labels, k, c)
        expected = Counter(zip(ids.tolist(), labels.tolist(), strict=True))
        assert all(counts[i, j] == expected[(i, j)] for i in range(k) for j in range(c))
        for score in ("precision", "count"):
            scores = alignment_scores(counts, score)
            mapping = match_clusters(scores)
            matched = mapping[mapping >= 0]
            assert len(matched) == min(k, c) and len(set(matched.tolist())) == min(k, c)
            total = sum(float(scores[i, y]) for i, y in enumerate(mapping.tolist()) if y >= 0)
            assert total == pytest.approx(brute_force(scores), abs=1e-12), (trial, score)
            # the accuracy is the share of images whose cluster is mapped to their own label
            lookup = torch.cat([mapping, torch.tensor([-1])])
            hits = (lookup[ids] == labels).sum().item()
            assert aligned_accuracy(counts, mapping) == pytest.approx(100 * hits / n)
        # with counts the matching maximises the accuracy itself
        best = brute_force(counts.double()) / n * 100
        assert aligned_accuracy(counts, match_clusters(alignment_scores(counts, "count"))) == (
            pytest.approx(best)
        )


def test_precision_and_count_scores_choose_differently():
    # cluster 0: 6 of class 0, 4 of class 1 (size 10); cluster 1: 1 of class 0 (size 1).
    counts = torch.tensor([[6, 4], [1, 0]])
    precision = match_clusters(alignment_scores(counts, "precision"))
    assert precision.tolist() == [1, 0]  # 0.4 + 1.0 beats 0.6 + 0.0
    assert aligned_accuracy(counts, precision) == pytest.approx(100 * 5 / 11)
    count = match_clusters(alignment_scores(counts, "count"))
    assert count.tolist() == [0, 1]  # 6 + 0 beats 4 + 1
    assert aligned_accuracy(counts, count) == pytest.approx(100 * 6 / 11)
    assert aligned_order(torch.tensor([2, -1, 0]), 3).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="score must be"):
        alignment_scores(counts, "recall")


def blobs(labels: torch.Tensor, centres: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return 3 * centres[labels] + 0.05 * torch.randn(len(labels), centres.shape[1], generator=gen)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_cluster_alignment_recovers_separable_classes(backend):
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(6)[:3]  # three orthogonal directions, one per class
    train_labels = torch.arange(3).repeat_interleave(20)
    val_labels = torch.tensor([2, 0, 1, 1, 2])
    train = blobs(train_labels, centres, gen)
    val = blobs(val_labels, centres, gen)
    results, counts = cluster_alignment(
        train, train_labels, val, val_labels, 3, seed=1, backend=backend
    )
    assert results["train_acc"] == 100.0 and results["val_acc"] == 100.0
    assert sorted(results["mapping"]) == [0, 1, 2] and results["cluster_sizes"] == [20, 20, 20]
    assert counts["val"].sum() == 5
    # K > C: the extra cluster has no class; train stays exact, one image per extra cluster lost
    results, _ = cluster_alignment(train, train_labels, val, val_labels, 3, num_clusters=4)
    assert sorted(results["mapping"]) == [-1, 0, 1, 2] and results["train_acc"] < 100.0
    # the val images go to the centroids fitted on train
    centroids, ids = kmeans_fit(train, 3, seed=1, backend=backend)
    assert torch.equal(nearest_centroid(train, centroids), ids)


def folder(root, n):
    """Three classes of ``n`` 8 px images each: one colour per class, plus noise."""
    gen = torch.Generator().manual_seed(0)
    for label, cls in enumerate(["cat", "dog", "fox"]):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = torch.full((8, 8, 3), 40.0)
            pixels[..., label] = 220
            pixels += 20 * torch.randn(8, 8, 3, generator=gen)
            Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(root / cls / f"{i}.png")
    return root


def test_cluster_command_on_image_folders(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "init.ckpt"
    save_random_init(ckpt)
    args = [
        f"data.train_root={folder(tmp_path / 'train', 6)}",
        f"data.val_root={folder(tmp_path / 'val', 2)}",
        "data.image_size=8",
        "data.num_workers=0",
        "features.progress_bar=false",
    ]
    eval_dir = ckpt.parent.parent / "eval"
    err = one_line_error(capsys, "eval", "cluster", str(ckpt), *args, "cluster.num_clusters=0")
    assert "cluster.num_clusters" in err and "at least 1" in err
    err = one_line_error(capsys, "eval", "cluster", str(ckpt), *args, "cluster.num_clusters=19")
    assert "19 clusters need at least 19 train images, got 18" in err
    assert not eval_dir.exists()  # nothing written by failed runs

    assert run_main("eval", "cluster", str(ckpt), *args) == 0
    out = capsys.readouterr().out
    assert "cluster alignment (K=3, precision)" in out and "confusion:" in out
    record = json.loads((eval_dir / "cluster_init.json").read_text())
    results = record["results"]
    assert record["num_train"] == 18 and record["num_val"] == 6
    assert sorted(results["mapping"]) == [0, 1, 2] and sum(results["cluster_sizes"]) == 18
    assert sorted(results["mapping_classes"]) == ["cat", "dog", "fox"]
    # colour classes: even an untrained network separates them
    assert results["train_acc"] == 100.0 and results["val_acc"] == 100.0
    assert record["settings"]["cluster"]["iters"] == 20
    assert (eval_dir / "cluster_init.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    more = ["cluster.num_clusters=4", "cluster.score=count", "cluster.backend=torch"]
    assert run_main("eval", "cluster", str(ckpt), *args, *more) == 0
    results = json.loads((eval_dir / "cluster_init_1.json").read_text())["results"]
    assert results["num_clusters"] == 4 and results["score"] == "count" and -1 in results["mapping"]
    assert (eval_dir / "cluster_init_1.png").is_file()
