"""The regression loss of BYOL, MSF, CMSF and SimReg, and the neighbour purity banks log."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lib.memory import MemoryBank


def regression_loss(predictions: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """``2 - 2 cos(p_i, t_ij)``, averaged over each query's targets, then over the queries.

    BYOL (Grill et al., 2020, Eq. 2) regresses each prediction onto one target; MSF
    (Koohpayegani et al., 2021, Sec. 3) onto the k nearest bank entries of the target; CMSF
    (Navaneet et al., 2022, Sec. 3) onto the k nearest entries of a constraint set.

    Args:
        predictions: ``(B, D)`` online predictions ``p``.
        targets: ``(B, D)`` (one target per query) or ``(B, k, D)`` (k targets per query). No
            gradient flows into them.
        valid: optional bool ``(B, k)``: which targets count. A query's loss is the mean over
            its valid targets; queries without any are left out of the batch mean (a batch
            without any gives 0, with a zero gradient).

    Both sides are L2-normalised and the loss is computed in float32, whatever the input dtype
    (bank rows may be stored in fp16 / bf16). Returns a float32 scalar.
    """
    p = F.normalize(predictions.float(), dim=-1)
    t = F.normalize(targets.detach().float(), dim=-1)
    if t.dim() == 2:
        t = t.unsqueeze(1)
    if valid is None:
        # linear in the targets: their mean is taken first (a B x D product, not B x k x D)
        return 2 - 2 * (p * t.mean(dim=1)).sum(dim=-1).mean()
    weights = valid.float()
    counts = weights.sum(dim=1)
    has_any = counts > 0
    per_query = (torch.einsum("bd,bkd->bk", p, t) * weights).sum(dim=1)[has_any] / counts[has_any]
    if per_query.numel() == 0:
        return p.sum() * 0.0
    return 2 - 2 * per_query.mean()


def simreg_loss(
    predictions: Sequence[Tensor], targets: Sequence[Tensor], weights: Sequence[float] | None = None
) -> Tensor:
    """SimReg's loss (Navaneet et al., BMVC 2021, arXiv 2201.05131, Sec. 3): for each teacher
    ``k`` the mean over the batch of ``||q - t||^2 = 2 - 2 cos(q, t)`` between the student's
    head output ``q`` and the teacher's feature ``t`` (both L2-normalised), then the average
    over the teachers weighted by ``weights`` (equal by default).

    Args:
        predictions: per teacher, ``(B, D_k)`` head outputs of the student.
        targets: per teacher, ``(B, D_k)`` teacher features (no gradient flows into them).
        weights: per teacher, a positive weight; the result divides by their sum.

    Returns a float32 scalar (:func:`regression_loss` per teacher).
    """
    if len(predictions) != len(targets) or not predictions:
        raise ValueError(
            f"simreg_loss needs one target per prediction, got {len(predictions)} predictions "
            f"and {len(targets)} targets"
        )
    w = [1.0] * len(predictions) if weights is None else [float(x) for x in weights]
    terms = [regression_loss(p, t) for p, t in zip(predictions, targets, strict=True)]
    return sum(wk * term for wk, term in zip(w, terms, strict=True)) / sum(w)


def neighbour_purity(bank: MemoryBank, indices: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """``{"purity": share}`` of the neighbours whose stored label equals their query's label.

    ``indices``: ``(B, k)`` bank rows (negative entries, "no neighbour", read as row 0, as a
    monitoring approximation); ``labels``: ``(B,)`` the queries' labels, -1 for unknown. Only
    queries with a known label count; ``{}`` when there is none. Logged as ``train/purity``.
    """
    known = labels >= 0
    if not bool(known.any()):
        return {}
    stored = bank.payload("labels")[indices.clamp(min=0)]
    return {"purity": (stored[known] == labels[known].unsqueeze(1)).float().mean()}
