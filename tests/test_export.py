"""``ssl-lib export``: strict loading into torchvision / timm twins, equal features, bad input."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import one_line_error, run_main, tiny_config
from torch import nn

from ssl_lib.config import config_from_dict
from ssl_lib.export import staged_resnet_to_torchvision
from ssl_lib.methods import build_method, load_method

TOL = 1e-5  # max abs difference of float32 features


@torch.no_grad()
def scramble(module: nn.Module, seed: int) -> None:
    """Give every weight and BatchNorm statistic a distinct random value, as training would.

    Fresh BatchNorm layers (mean 0, var 1, gamma 1, beta 0) would hide a mix-up of BN tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        noise = torch.rand(t.shape, generator=gen)
        if name.endswith("running_var"):
            t.copy_(0.5 + noise)
        else:
            t.add_(0.1 * (noise - 0.5))


def save_checkpoint(path, method_name: str, backbone: str) -> None:
    """An ``ssl-lib train``-format checkpoint whose online and target backbones differ."""
    torch.manual_seed(0)
    method = build_method(config_from_dict(tiny_config(method_name, model={"backbone": backbone})))
    scramble(method.backbone, 1)
    if method.uses_target:
        scramble(method.target["backbone"], 2)
    torch.save({"hyper_parameters": method.hparams, "state_dict": method.state_dict()}, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """BYOL checkpoints by backbone name, made on first use and shared by the tests."""
    folder = tmp_path_factory.mktemp("ckpts")
    made = {}

    def get(backbone: str):
        if backbone not in made:
            made[backbone] = folder / f"byol_{backbone.replace(':', '_')}.ckpt"
            save_checkpoint(made[backbone], "byol", backbone)
        return made[backbone]

    return get


@pytest.fixture(scope="module")
def reference():
    """``reference(ckpt, part, x)``: what ``load_method(ckpt)`` computes, ``model(x)`` or its
    target backbone's features (each checkpoint is loaded once per module)."""
    methods: dict = {}

    def compute(ckpt, part: str, x: torch.Tensor) -> torch.Tensor:
        if ckpt not in methods:
            methods[ckpt] = load_method(str(ckpt)).eval()
        method = methods[ckpt]
        with torch.no_grad():
            return method(x) if part == "backbone" else method.target["backbone"](x)

    return compute


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def export(capsys, ckpt, out, *options: str) -> nn.Module:
    """Run ``ssl-lib export`` and the loading code it prints; returns that code's ``model``."""
    assert run_main("export", str(ckpt), str(out), *options) == 0
    printed = capsys.readouterr().out
    code = printed.split("load it with:\n", 1)[1]
    namespace: dict = {}
    exec("\n".join(line.removeprefix("    ") for line in code.splitlines()), namespace)
    return namespace["model"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_export_loads_strictly_and_gives_the_same_features(
    arch, checkpoints, reference, tmp_path, capsys
):
    ckpt = checkpoints(arch)
    x = torch.randn(3, 3, 64, 64)
    seen = []
    for part in ("backbone", "target"):
        out = tmp_path / f"{part}.pth"
        printed_model = export(capsys, ckpt, out, "--part", part)  # default: torchvision
        weights = torch.load(out, weights_only=True)
        model = getattr(torchvision.models, arch)()
        result = model.load_state_dict(weights, strict=False)
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
        assert result.unexpected_keys == []
        model.fc = nn.Identity()
        model.load_state_dict(weights, strict=True)
        expected = reference(ckpt, part, x)
        assert (features(model, x) - expected).abs().max() <= TOL
        assert (features(printed_model, x) - expected).abs().max() <= TOL
        seen.append(expected)
    assert (seen[0] - seen[1]).abs().max() > 1e-3  # the two parts are different networks


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_timm_export_loads_strictly_and_gives_the_same_features(
    arch, checkpoints, reference, tmp_path, capsys
):
    timm = pytest.importorskip("timm")
    ckpt = checkpoints(arch)
    out = tmp_path / "timm.pth"
    printed_model = export(capsys, ckpt, out, "--format", "timm")
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(3, 3, 64, 64)
    expected = reference(ckpt, "backbone", x)
    assert (features(model, x) - expected).abs().max() <= TOL
    assert (features(printed_model, x) - expected).abs().max() <= TOL


def test_a_timm_backbone_exports_as_its_timm_model(checkpoints, reference, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    ckpt = checkpoints("timm:resnet18")
    out = tmp_path / "timm.pth"
    printed_model = export(capsys, ckpt, out)  # default: timm
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    expected = reference(ckpt, "backbone", x)
    assert (features(model, x) - expected).abs().max() <= TOL
    assert (features(printed_model, x) - expected).abs().max() <= TOL
    err = one_line_error(
        capsys, "export", str(ckpt), str(tmp_path / "tv.pth"), "--format", "torchvision"
    )
    assert "backbone 'timm:resnet18'" in err and "--format timm or state_dict" in err


def test_cifar_stem_exports_as_torchvision_resnet_with_the_stem_swapped(
    checkpoints, reference, tmp_path, capsys
):
    ckpt = checkpoints("resnet18_cifar")
    out = tmp_path / "cifar.pth"
    printed_model = export(capsys, ckpt, out)
    weights = torch.load(out, weights_only=True)
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.load_state_dict(weights, strict=True)
    x = torch.randn(3, 3, 32, 32)
    expected = reference(ckpt, "backbone", x)
    assert (features(model, x) - expected).abs().max() <= TOL
    assert (features(printed_model, x) - expected).abs().max() <= TOL
    err = one_line_error(capsys, "export", str(ckpt), str(tmp_path / "t.pth"), "--format", "timm")
    assert "backbone 'resnet18_cifar'" in err and "no timm twin" in err
    assert "--format torchvision or state_dict" in err
    assert not (tmp_path / "t.pth").exists()


def test_a_backbone_without_twin_exports_its_state_dict(checkpoints, reference, tmp_path, capsys):
    ckpt = checkpoints("tiny_cnn")
    x = torch.randn(4, 3, 32, 32)
    for part in ("backbone", "target"):
        out = tmp_path / f"{part}.pth"
        model = export(capsys, ckpt, out, "--part", part)  # default: state_dict
        assert all(key.startswith("stages.") for key in torch.load(out, weights_only=True))
        assert (features(model, x) - reference(ckpt, part, x)).abs().max() <= TOL
    for fmt in ("torchvision", "timm"):
        err = one_line_error(capsys, "export", str(ckpt), str(tmp_path / "x.pth"), "--format", fmt)
        assert f"backbone 'tiny_cnn' of checkpoint '{ckpt}' has no {fmt} twin" in err
        assert "--format state_dict" in err
    assert not (tmp_path / "x.pth").exists()


def test_bad_input_gives_one_line_and_writes_nothing(checkpoints, tmp_path, capsys):
    ckpt = checkpoints("tiny_cnn")
    out = tmp_path / "new" / "weights.pth"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    unregistered = tmp_path / "unregistered.ckpt"
    state = torch.load(ckpt, weights_only=False)
    state["hyper_parameters"]["config"]["method"]["name"] = "simclr"
    torch.save(state, unregistered)
    barlow = tmp_path / "barlow.ckpt"
    save_checkpoint(barlow, "barlow_twins", "tiny_cnn")
    cases = [
        ([text, out], f"checkpoint '{text}' cannot be read"),
        ([foreign, out], f"checkpoint '{foreign}' was not written by ssl-lib train"),
        ([tmp_path / "none.ckpt", out], "does not exist"),
        ([unregistered, out], "unknown method 'simclr'"),
        ([ckpt, out, "--format", "onnx"], "--format 'onnx' is not accepted; choose from"),
        ([ckpt, out, "--part", "head"], "--part 'head' is not accepted; choose from"),
        ([barlow, out, "--part", "target"], "keeps no EMA target (methods with one: byol"),
        ([ckpt, tmp_path], "is a folder"),
        ([ckpt, ckpt, "--force"], "is the checkpoint itself"),
    ]
    for args, expected in cases:
        err = one_line_error(capsys, "export", *map(str, args))
        assert expected in err, err
        assert not out.parent.exists()
    # an existing file is kept unless --force
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"the user's own file")
    err = one_line_error(capsys, "export", str(ckpt), str(mine))
    assert f"OUT '{mine}' exists" in err and "--force" in err
    assert mine.read_bytes() == b"the user's own file"
    assert run_main("export", str(ckpt), str(mine), "--force") == 0
    assert (
        torch.load(mine, weights_only=True).keys()
        == load_method(str(ckpt)).backbone.state_dict().keys()
    )


def test_renaming_rejects_keys_outside_the_resnet_layout():
    renamed = staged_resnet_to_torchvision(
        {"stages.0.0.weight": torch.zeros(1), "stages.3.1.bn2.bias": torch.ones(1)}
    )
    assert list(renamed) == ["conv1.weight", "layer4.1.bn2.bias"]
    with pytest.raises(ValueError, match="'stages.4.0.weight' is not part of"):
        staged_resnet_to_torchvision({"stages.4.0.weight": torch.zeros(1)})
