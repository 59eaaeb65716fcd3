"""Frozen teachers for distillation (SimReg, CompRess): the spec, strict loading, a fingerprint.

A teacher is described by a :class:`TeacherConfig` in the method's ``teachers`` list (see
``docs/distillation.md``). It is one of

* ``kind: ssl_lib``: a checkpoint written by ``ssl-lib train`` (any method); ``part`` picks
  the online backbone or the EMA target, ``feature`` the backbone output or backbone +
  projector;
* ``kind: backbone``: an ssl_lib backbone name (``ssl-lib backbones``) with a weights file of
  its own keys, e.g. written by ``ssl-lib export --format state_dict``;
* ``kind: torchvision`` / ``kind: timm``: a torchvision or timm model name with a local
  weights file; the classifier is removed (pooled features);
* any of these with ``cache:``: the features come from a cache written by
  ``ssl-lib cache-features`` (:mod:`ssl_lib.distill.cache`), the network is not built.

Keys are mapped strictly (:func:`map_teacher_keys`): ``key_prefix`` selects and strips the
keys of the file (e.g. ``module.encoder_q.`` of a MoCo checkpoint), ``ignore_keys`` drops
prefixes after that (e.g. ``fc.``), and any missing, unexpected or mis-shaped key stops with
one line (the CompRess and SimReg code load with ``strict=False``, where a wrong prefix gives
a random teacher without a word).

The teacher is frozen: no gradients, always in eval mode, and it is kept out of the student's
module tree, so it is neither optimised nor saved in the student's checkpoints; the run
records its spec (in ``config.yaml``) and its fingerprint (:func:`teacher_fingerprint`)
instead and rebuilds it from the spec when a run resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssl_lib.checkpoints import CheckpointError, read_checkpoint
from ssl_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_lib.distill.cache import TeacherCache
from ssl_lib.models import MLPConfig, build_backbone, build_mlp
from ssl_lib.schema import InvalidValue, Section, require

KINDS = ("ssl_lib", "backbone", "torchvision", "timm")
# Spec fields that change what the teacher computes; the fingerprint covers them.
FINGERPRINT_FIELDS = ("kind", "arch", "part", "feature", "key_prefix", "ignore_keys", "input_norm")
_CHUNK = 1 << 22


@dataclass
class TeacherConfig(Section):
    """One frozen teacher.

    ``path``: the checkpoint (``ssl_lib``) or weights file (other kinds). ``arch``: the model
    name for ``backbone`` / ``torchvision`` / ``timm``. ``part``: ``backbone`` or ``target``
    (EMA) of an ssl_lib checkpoint; ``feature``: ``backbone`` (pooled features) or
    ``projector`` (backbone + the checkpoint's projector; ssl_lib only). ``input_norm``:
    the input the teacher expects: ``imagenet`` (the views as ssl_lib makes them, ImageNet
    mean / std) or ``none`` (pixels in [0, 1], e.g. the converted SimCLR weights; CompRess
    ``cache_feats.py --data_pre_processing SimCLR``). ``cache``: a feature cache folder
    (``ssl-lib cache-features``) read instead of running the network; with ``path`` set too,
    the cache must have been written by this very teacher. ``weight``: the teacher's weight in
    SimReg's average over teachers. ``dim``: the feature width, filled in from the teacher when
    training starts (recorded in ``config.yaml``).
    """

    CHOICES: ClassVar[dict[str, Sequence[str]]] = {
        "kind": KINDS,
        "part": ("backbone", "target"),
        "feature": ("backbone", "projector"),
        "input_norm": ("imagenet", "none"),
    }

    kind: str = "ssl_lib"
    path: str | None = None
    arch: str | None = None
    part: str = "backbone"
    feature: str = "backbone"
    key_prefix: str = ""
    ignore_keys: list[str] = field(default_factory=list)
    input_norm: str = "imagenet"
    cache: str | None = None
    weight: float = 1.0
    dim: int | None = None

    def check(self) -> None:
        super().check()
        require(
            self.path is not None or self.cache is not None,
            "path",
            "is not set: name the teacher's checkpoint or weights file (or set cache to a "
            "folder written by ssl-lib cache-features)",
        )
        require(
            self.kind == "ssl_lib" or self.path is None or bool(self.arch),
            ("arch", "kind"),
            f"must name the {self.kind} model of the weights file (e.g. resnet50)",
        )
        require(
            self.kind == "ssl_lib" or (self.part == "backbone" and self.feature == "backbone"),
            ("part", "feature", "kind"),
            f"apply to kind=ssl_lib checkpoints only (kind={self.kind} gives pooled features)",
        )
        require(self.weight > 0, "weight", f"must be > 0, got {self.weight}")


def check_teachers(teachers: Sequence[TeacherConfig], low: int, high: int | None) -> None:
    """Raise :class:`InvalidValue` unless there are ``low`` to ``high`` valid teachers."""
    most = "" if high is None else f" and at most {high}"
    require(
        len(teachers) >= low and (high is None or len(teachers) <= high),
        "teachers",
        f"needs at least {low}{most} teacher(s), got {len(teachers)} (see docs/distillation.md)",
    )
    for i, teacher in enumerate(teachers):
        try:
            teacher.check()
        except InvalidValue as err:
            raise InvalidValue(tuple(f"teachers.{i}.{k}" for k in err.keys), err.problem) from None


def spec_dict(cfg: Any) -> dict[str, Any]:
    """The fingerprinted fields of a teacher spec as plain values."""
    return {
        key: list(getattr(cfg, key)) if key == "ignore_keys" else getattr(cfg, key)
        for key in FINGERPRINT_FIELDS
    }


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def teacher_fingerprint(cfg: Any) -> str:
    """SHA-256 of the teacher's weights file and the spec fields that change its output.

    Two specs share a fingerprint exactly when they load the same bytes the same way
    (``kind``, ``arch``, ``part``, ``feature``, ``key_prefix``, ``ignore_keys``,
    ``input_norm``). Raises :class:`CheckpointError` when the file does not exist.
    """
    path = _existing(cfg.path)
    blob = json.dumps({**spec_dict(cfg), "file_sha256": file_sha256(path)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _existing(path: str | None) -> Path:
    if path is None:
        raise CheckpointError("teacher: no path given (teacher.path)")
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"teacher weights file '{p}' does not exist (teacher.path); give the checkpoint or "
            "weights file of the teacher"
        )
    return p


def map_teacher_keys(
    state: dict[str, Tensor],
    expected: dict[str, Tensor],
    key_prefix: str,
    ignore_keys: Sequence[str],
    source: str,
) -> dict[str, Tensor]:
    """The entries of ``state`` renamed to the keys of ``expected``, checked strictly.

    Keys of ``state`` that start with ``key_prefix`` are kept with the prefix removed (all
    keys when it is empty); those that then start with one of ``ignore_keys`` are dropped.
    The result must have exactly the keys of ``expected`` (a model's ``state_dict``) with the
    same shapes. Raises :class:`CheckpointError`, one line naming ``source``, the first
    missing and the first unexpected key (or the first shape mismatch).
    """
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(key_prefix):
            continue
        key = key[len(key_prefix) :]
        if any(key.startswith(p) for p in ignore_keys):
            continue
        mapped[key] = value
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first '{unexpected[0]}')")
        first = next(iter(state), None)
        raise CheckpointError(
            f"teacher weights '{source}' do not match the model after key_prefix="
            f"'{key_prefix}' and ignore_keys={list(ignore_keys)}: {' and '.join(parts)} keys; "
            f"the file's first key is '{first}' (set teacher.key_prefix / teacher.ignore_keys)"
        )
    for key, value in expected.items():
        if tuple(mapped[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"teacher weights '{source}': key '{key}' has shape {tuple(mapped[key].shape)}, "
                f"the model expects {tuple(value.shape)} (teacher.arch may be wrong)"
            )
    return mapped


def _weights_state(path: Path) -> dict[str, Tensor]:
    """The ``{key: tensor}`` dict of a weights file (or of its ``state_dict`` / ``model``
    entry, as in MoCo / SwAV / BYOL-converted checkpoints)."""
    try:
        # Full unpickling: research checkpoints hold argparse namespaces beside the weights;
        # the file is one the user named as the teacher.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for damaged files
        raise CheckpointError(
            f"teacher weights file '{path}' cannot be read: {type(err).__name__}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"teacher weights file '{path}' holds no dict of tensors")
    return obj


def _strip_classifier(net: nn.Module, arch: str) -> nn.Module:
    for name in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(net, name, None), nn.Module):
            setattr(net, name, nn.Identity())
            return net
    raise CheckpointError(f"torchvision model '{arch}' has no fc / classifier / heads to remove")


def _ssl_lib_network(cfg: Any) -> tuple[nn.Module, dict[str, Tensor], str]:
    """(network, its weights, input norm) from an ``ssl-lib train`` checkpoint."""
    path = _existing(cfg.path)
    ckpt = read_checkpoint(path)
    config, state = ckpt["hyper_parameters"]["config"], ckpt["state_dict"]
    start = "target." if cfg.part == "target" else ""
    if cfg.part == "target" and not any(k.startswith("target.") for k in state):
        raise CheckpointError(
            f"teacher checkpoint '{path}' (method {config['method']['name']}) keeps no EMA "
            "target: set teacher.part=backbone"
        )
    # A ViT is built for the size it was trained at (its position embeddings depend on it).
    backbone = build_backbone(config["model"]["backbone"], image_size=config["data"]["image_size"])
    modules: list[nn.Module] = [backbone]
    if cfg.feature == "projector":
        proj = config["model"].get("projector")
        if proj is None:
            raise CheckpointError(
                f"teacher checkpoint '{path}' has no projector (model.projector: null): set "
                "teacher.feature=backbone"
            )
        modules.append(build_mlp(backbone.feat_dim, MLPConfig(**proj)))
    net = nn.Sequential(*modules)
    prefixes = {"0.": f"{start}backbone.", "1.": f"{start}projector."}
    selected = {}
    for key, value in state.items():
        for ours, theirs in prefixes.items():
            if key.startswith(theirs) and (ours == "0." or cfg.feature == "projector"):
                selected[ours + key[len(theirs) :]] = value
    weights = map_teacher_keys(selected, net.state_dict(), "", [], str(path))
    return net, weights, "imagenet"


def build_network(cfg: Any) -> nn.Module:
    """The teacher network of a spec (not a cache), weights loaded strictly, frozen, eval.

    Raises :class:`CheckpointError` (missing file, wrong keys or shapes) and ``ValueError``
    (unknown ``arch``).
    """
    if cfg.kind == "ssl_lib":
        net, weights, _ = _ssl_lib_network(cfg)
    else:
        path = _existing(cfg.path)
        if cfg.kind == "backbone":
            net = build_backbone(cfg.arch)
        elif cfg.kind == "torchvision":
            import torchvision

            try:
                net = torchvision.models.get_model(cfg.arch, weights=None)
            except ValueError as err:
                raise CheckpointError(f"teacher.arch: {err}") from None
            net = _strip_classifier(net, cfg.arch)
        else:
            net = build_backbone(f"timm:{cfg.arch}")
        state = _weights_state(path)
        weights = map_teacher_keys(state, net.state_dict(), cfg.key_prefix, cfg.ignore_keys, path)
    net.load_state_dict(weights, strict=True)
    return net.eval().requires_grad_(False)


class Teacher(nn.Module):
    """A frozen teacher: images (or dataset indices, for a cache) -> ``(B, dim)`` float32.

    ``net`` is the network (``None`` for a cache), ``cache`` a
    :class:`TeacherCache`. The module stays in eval mode whatever
    ``train()`` asks and computes no gradients. With ``input_norm: none`` the ImageNet
    normalisation of the views is undone before the network sees them.
    """

    def __init__(
        self,
        cfg: Any,
        net: nn.Module | None,
        cache: TeacherCache | None,
        fingerprint: str | None,
        dim: int,
    ) -> None:
        super().__init__()
        self.spec = spec_dict(cfg)
        self.net = net
        self.cache = cache
        self.fingerprint = fingerprint
        self.dim = dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """Always eval mode: a frozen teacher's BatchNorm uses its running statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, index: Tensor) -> Tensor:
        """Features of ``images`` ``(B, 3, H, W)`` (or cached rows of dataset ``index``)."""
        if self.net is None:
            return self.cache.rows(index).to(images.device)
        if self.spec["input_norm"] == "none":
            images = images * self.std + self.mean
        return self.net(images).flatten(1).float()


def build_teacher(cfg: Any) -> Teacher:
    """A :class:`Teacher` from a spec (a :class:`TeacherConfig` or its DictConfig).

    With ``cache`` set, the cache is opened (and, with ``path`` set, its fingerprint checked);
    otherwise the network is built and loaded strictly. Raises :class:`CheckpointError`.
    """
    fingerprint = teacher_fingerprint(cfg) if cfg.path is not None else None
    if cfg.cache is not None:
        cache = TeacherCache(cfg.cache)
        cache.check_fingerprint(fingerprint)
        return Teacher(cfg, None, cache, fingerprint or cache.fingerprint, cache.dim)
    net = build_network(cfg)
    return Teacher(cfg, net, None, fingerprint, _feature_dim(net))


def _feature_dim(net: nn.Module) -> int:
    """Output width: the declared one of ssl_lib / timm backbones and MLP heads, else measured
    on one 224 px image (torchvision models declare none once their classifier is removed)."""
    last = net[-1] if isinstance(net, nn.Sequential) else net
    if isinstance(last, nn.Sequential) and isinstance(last[-1], nn.Linear):
        return last[-1].out_features  # an MLP projector
    for attr in ("feat_dim", "num_features"):
        if isinstance(getattr(last, attr, None), int):
            return getattr(last, attr)
    with torch.no_grad():
        return int(net(torch.zeros(1, 3, 224, 224)).flatten(1).shape[1])
