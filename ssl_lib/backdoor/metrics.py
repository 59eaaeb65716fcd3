"""Backdoor metrics from confusion matrices (rows: true class, columns: predicted class).

Definitions (docs/backdoor.md):

* ``TP_c = C[c, c]``; ``FP_c = sum_{i != c} C[i, c]`` (column sum minus diagonal): images of
  other classes predicted as ``c`` -- Saha et al., *Backdoor Attacks on Self-Supervised
  Learning*, CVPR 2022 (arXiv 2105.10123), whose experiments read the attack off
  the target's FP on patched validation images against its FP on clean ones.
* attack success rate ``ASR = FP_target(patched) / #(patched images not of the target class)``:
  target-class images are excluded (they would count as successes without any backdoor).
* ``NFP = FP_target / max_c FP_c`` (Tejankar et al., *Defending Against Patch-based Backdoor
  Attacks on Self-Supervised Learning* (PatchSearch), CVPR 2023).
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of images of class ``i`` predicted as ``j`` (int64, C x C).

    ``true`` and ``pred``: integer labels in ``[0, num_classes)``, same length. Raises
    ``ValueError`` otherwise.
    """
    true, pred = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"true and pred must be 1-D of one length, got {true.shape}, {pred.shape}")
    if len(true) and (
        min(true.min(), pred.min()) < 0 or max(true.max(), pred.max()) >= num_classes
    ):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def true_positives(conf: np.ndarray) -> np.ndarray:
    """``TP_c = C[c, c]`` for every class (int64, shape ``(C,)``)."""
    return np.diag(conf).astype(np.int64)


def false_positives(conf: np.ndarray) -> np.ndarray:
    """``FP_c = sum_{i != c} C[i, c]`` for every class (int64, shape ``(C,)``)."""
    return conf.sum(axis=0).astype(np.int64) - true_positives(conf)


def accuracy(conf: np.ndarray) -> float:
    """Top-1 accuracy in %: trace / total (``nan`` for an empty matrix)."""
    total = conf.sum()
    return float("nan") if total == 0 else 100.0 * float(np.trace(conf)) / float(total)


def attack_success_rate(conf_patched: np.ndarray, target: int) -> float:
    """``FP_target / #non-target images`` of the patched set, in % (``nan`` if there are none)."""
    others = conf_patched.sum() - conf_patched[target].sum()
    return float("nan") if others == 0 else 100.0 * false_positives(conf_patched)[target] / others


def normalized_fp(conf: np.ndarray, target: int) -> float:
    """``NFP = FP_target / max_c FP_c`` in [0, 1] (``nan`` when no class has a false positive)."""
    fp = false_positives(conf)
    return float("nan") if fp.max() == 0 else float(fp[target]) / float(fp.max())


def backdoor_metrics(conf_clean: np.ndarray, conf_patched: np.ndarray, target: int) -> dict:
    """Every headline figure for one probe: accuracies (%), FP of the target on both sets,
    ASR (%) and NFP on both sets."""
    return {
        "clean_acc": accuracy(conf_clean),
        "patched_acc": accuracy(conf_patched),
        "fp_target_clean": int(false_positives(conf_clean)[target]),
        "fp_target_patched": int(false_positives(conf_patched)[target]),
        "asr": attack_success_rate(conf_patched, target),
        "asr_clean": attack_success_rate(conf_clean, target),
        "nfp_clean": normalized_fp(conf_clean, target),
        "nfp_patched": normalized_fp(conf_patched, target),
    }
