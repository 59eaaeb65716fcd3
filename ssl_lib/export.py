"""``ssl-lib export``: a checkpoint's backbone as weights for torchvision, timm or ssl_lib.

A trained backbone is a :class:`~ssl_lib.models.StagedBackbone`, whose keys are
``stages.N....``. This module renames them to the keys of the backbone's *twin* (the
torchvision or timm model with the same layers and the same forward pass), so the file loads
with ``load_state_dict(..., strict=True)`` into that model with its classifier removed, and
gives the same features as ``load_method(checkpoint)(images)``. See ``docs/export.md``.

The renaming and the loading instructions are pure functions of the backbone name;
:func:`export_weights` is the one entry point that reads a checkpoint and writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ssl_lib.checkpoints import CheckpointError, atomic_save
from ssl_lib.config import ConfigError
from ssl_lib.eval.runner import load_checkpoint_model
from ssl_lib.methods import METHODS
from ssl_lib.models.backbones import RESNET_ARCHS, VIT_PATCH_SIZES

FORMATS = ("torchvision", "timm", "state_dict")
PARTS = ("backbone", "target")
CIFAR_SUFFIX = "_cifar"

# How ssl_lib.models.backbones._resnet lays a torchvision ResNet out in stages:
# stage 0 = Sequential(conv1, bn1, relu, maxpool, layer1), then layer2, layer3, layer4.
# relu and maxpool hold no tensors, so indices 2 and 3 never occur.
_STAGE_TO_RESNET = {
    "stages.0.0.": "conv1.",
    "stages.0.1.": "bn1.",
    "stages.0.4.": "layer1.",
    "stages.1.": "layer2.",
    "stages.2.": "layer3.",
    "stages.3.": "layer4.",
}


def _resnet_arch(backbone: str) -> tuple[str, bool] | None:
    """``(torchvision arch, cifar stem)`` for a built-in ResNet backbone name, else ``None``."""
    cifar = backbone.endswith(CIFAR_SUFFIX)
    arch = backbone[: -len(CIFAR_SUFFIX)] if cifar else backbone
    return (arch, cifar) if arch in RESNET_ARCHS else None


def twin_formats(backbone: str) -> tuple[str, ...]:
    """The export formats available for ``backbone`` (an ssl_lib backbone name).

    The first is the default of ``ssl-lib export``. Built-in ResNets have a torchvision twin
    (the ``_cifar`` variants with their 3x3 stride-1 first conv and no max-pool swapped in) and,
    with the standard stem, a timm twin (timm's ``resnetNN`` has torchvision's layers and key
    names). A ``timm:<name>`` backbone is a timm model already. ``state_dict`` (the backbone's
    own keys, rebuilt with :func:`ssl_lib.models.build_backbone`) works for every backbone.
    """
    resnet = _resnet_arch(backbone)
    if resnet is not None:
        return ("torchvision", "state_dict") if resnet[1] else ("torchvision", "timm", "state_dict")
    if backbone.startswith("timm:"):
        return ("timm", "state_dict")
    return ("state_dict",)


def staged_resnet_to_torchvision(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a built-in ResNet ``StagedBackbone`` state dict to torchvision ResNet keys.

    ``stages.0.0.weight`` -> ``conv1.weight``, ``stages.0.4.1.bn2.bias`` ->
    ``layer1.1.bn2.bias``, ``stages.3.0.downsample.0.weight`` ->
    ``layer4.0.downsample.0.weight``, ... The tensors are the same objects; timm's ResNets
    use the same keys. Raises ``ValueError`` naming a key outside that layout.
    """
    renamed = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _STAGE_TO_RESNET if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"backbone key '{key}' is not part of a torchvision ResNet layout")
        renamed[_STAGE_TO_RESNET[prefix] + key[len(prefix) :]] = value
    return renamed


def convert_state_dict(state_dict: dict[str, Tensor], backbone: str, fmt: str) -> dict[str, Tensor]:
    """The backbone's ``state_dict`` with the keys of format ``fmt`` (one of ``twin_formats``)."""
    if fmt == "state_dict" or backbone.startswith("timm:"):
        return dict(state_dict)
    return staged_resnet_to_torchvision(state_dict)


def load_code(backbone: str, fmt: str, path: str | Path, image_size: int | None = None) -> str:
    """Python lines that build ``model`` and load the exported file ``path`` strictly into it.

    ``model(images)`` then gives the backbone features, ``(B, feat_dim)`` float32: the
    classifier ``fc`` is replaced by ``nn.Identity`` (torchvision) or left out with
    ``num_classes=0`` (timm), as the file holds no classifier. A vision transformer is rebuilt
    for ``image_size``, the size it was trained at (its position embeddings depend on it).
    """
    load = f"model.load_state_dict(torch.load({str(path)!r}))"
    if fmt == "state_dict":
        lines = [
            "import torch",
            "from ssl_lib.models import build_backbone",
            f"model = build_backbone({backbone!r}, image_size={image_size!r})"
            if backbone in VIT_PATCH_SIZES  # built for the size it was trained at
            else f"model = build_backbone({backbone!r})",
        ]
    elif fmt == "timm":
        name = backbone[len("timm:") :] if backbone.startswith("timm:") else backbone
        lines = [
            "import timm",
            "import torch",
            f"model = timm.create_model({name!r}, num_classes=0)",
        ]
    else:
        arch, cifar = _resnet_arch(backbone)
        lines = ["import torch", "import torchvision", f"model = torchvision.models.{arch}()"]
        if cifar:  # the CIFAR stem of ssl_lib.models.backbones._resnet
            lines += [
                "model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, "
                "bias=False)",
                "model.maxpool = torch.nn.Identity()",
            ]
        lines.append("model.fc = torch.nn.Identity()")
    return "\n".join([*lines, load, "model.eval()"])


@dataclass(frozen=True)
class ExportedWeights:
    """What :func:`export_weights` wrote: the file, its format and how to load it."""

    path: Path
    checkpoint: Path
    method: str
    backbone: str
    part: str
    format: str
    num_tensors: int
    load_code: str

    def summary(self) -> str:
        """The lines ``ssl-lib export`` prints."""
        code = "\n".join(f"    {line}" for line in self.load_code.splitlines())
        return (
            f"exported the {self.part} of {self.checkpoint} ({self.method}, {self.backbone}) "
            f"as {self.format} weights ({self.num_tensors} tensors): {self.path}\n"
            f"load it with:\n{code}"
        )


def export_weights(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str | None = None,
    part: str = "backbone",
    force: bool = False,
) -> ExportedWeights:
    """Write the backbone of an ``ssl-lib train`` checkpoint to ``out`` in format ``fmt``.

    Args:
        checkpoint: a checkpoint written by ``ssl-lib train`` (any method).
        out: the file to write (a ``torch.save`` of a plain ``{key: tensor}`` dict, loadable
            with ``torch.load(out, weights_only=True)``); its folder is created.
        fmt: ``torchvision``, ``timm`` or ``state_dict``; ``None`` picks the first of
            :func:`twin_formats` (torchvision for the ResNets, timm for ``timm:`` backbones).
        part: ``backbone`` (the online backbone, what evaluators probe) or ``target`` (the
            EMA target's backbone, for methods that keep one: BYOL, MoCo, ISD, MSF, CMSF).
        force: overwrite an existing ``out``.

    Raises:
        ConfigError: unknown ``fmt`` or ``part``; a format the backbone has no twin in;
            ``out`` exists (without ``force``), is a folder or is the checkpoint itself.
        CheckpointError: an unreadable or foreign checkpoint, an unregistered method, or
            ``part="target"`` for a method without an EMA target.

    Every check runs before anything is written.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not accepted; choose from {', '.join(FORMATS)}")
    if part not in PARTS:
        raise ConfigError(f"--part {part!r} is not accepted; choose from {', '.join(PARTS)}")
    if out.is_dir():
        raise ConfigError(f"OUT '{out}' is a folder; give the path of the file to write")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise ConfigError(f"OUT '{out}' is the checkpoint itself; give another path")
    if out.exists() and not force:
        raise ConfigError(f"OUT '{out}' exists; choose another path or pass --force to replace it")
    method = load_checkpoint_model(checkpoint)
    name, backbone = method.cfg.method.name, method.cfg.model.backbone
    formats = twin_formats(backbone)
    fmt = fmt or formats[0]
    if fmt not in formats:
        raise ConfigError(
            f"backbone '{backbone}' of checkpoint '{checkpoint}' has no {fmt} twin; "
            f"export it with --format {' or '.join(formats)} (see docs/export.md)"
        )
    if part == "target" and not method.uses_target:
        with_target = ", ".join(n for n in METHODS.names() if METHODS.get(n).uses_target)
        raise CheckpointError(
            f"--part target: method '{name}' of checkpoint '{checkpoint}' keeps no EMA target "
            f"(methods with one: {with_target}); use --part backbone"
        )
    module = method.target["backbone"] if part == "target" else method.backbone
    weights = convert_state_dict(module.state_dict(), backbone, fmt)
    code = load_code(backbone, fmt, out, method.cfg.data.image_size)
    atomic_save(weights, out)
    return ExportedWeights(
        path=out,
        checkpoint=checkpoint,
        method=name,
        backbone=backbone,
        part=part,
        format=fmt,
        num_tensors=len(weights),
        load_code=code,
    )
