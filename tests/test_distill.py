"""Distillation (SimReg, CompRess): losses against plain formulas, heads, frozen teachers,
strict key mapping, the teacher cache and its refusals, and the real commands once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import teacher_override, tiny_config, write_tiny_teacher
from omegaconf import OmegaConf
from torch import nn

from ssl_lib.checkpoints import CheckpointError
from ssl_lib.cli import main
from ssl_lib.config import ConfigError, config_from_dict, load_config
from ssl_lib.data import IndexedDataset, build_base_dataset
from ssl_lib.data.transforms import eval_transform
from ssl_lib.distill import (
    TeacherCache,
    TeacherConfig,
    build_teacher,
    map_teacher_keys,
    write_cache,
)
from ssl_lib.methods import build_method, load_method
from ssl_lib.methods.compress import compress_loss
from ssl_lib.methods.isd import isd_loss
from ssl_lib.methods.losses import simreg_loss
from ssl_lib.methods.simreg import simreg_head
from ssl_lib.train import train

SIMREG = {"model": {"projector": None, "predictor": None}, "data": {"views": ["weak"]}}


def distill_config(method: str, teacher: Path, overrides: list[str] = (), **sections):
    sections = {**({} if method == "compress" else SIMREG), **sections}
    base = tiny_config(method, **sections)
    return config_from_dict(base, [teacher_override(teacher), *overrides])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return write_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny.pt")


def test_simreg_loss_is_the_weighted_mean_of_squared_distances():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)]
    targets = [torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)]
    weights = [1.0, 3.0]
    expected = 0.0
    for w, p, t in zip(weights, preds, targets, strict=True):
        per_sample = [
            float(((p[i] / p[i].norm() - t[i] / t[i].norm()) ** 2).sum()) for i in range(5)
        ]
        expected += w * sum(per_sample) / 5
    expected /= sum(weights)
    assert float(simreg_loss(preds, targets, weights)) == pytest.approx(expected, rel=1e-5)
    assert float(simreg_loss(preds[:1], targets[:1])) == pytest.approx(
        float(simreg_loss(preds[:1], targets[:1], [7.0])), rel=1e-6
    )


def test_compress_loss_is_kl_of_teacher_to_student_batchmean():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g)
    bank_s, bank_t = torch.randn(7, 4, generator=g), torch.randn(7, 6, generator=g)
    ts, tt = 0.07, 0.04
    total = 0.0
    for i in range(3):
        zs = [float(s[i] @ bank_s[j]) / float(s[i].norm()) / ts for j in range(7)]
        zt = [float(t[i] @ bank_t[j]) / float(t[i].norm()) / tt for j in range(7)]
        ls = [z - math.log(sum(math.exp(x) for x in zs)) for z in zs]
        lt = [z - math.log(sum(math.exp(x) for x in zt)) for z in zt]
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
    loss, teacher_sims = compress_loss(s, t, bank_s, bank_t, ts, tt)
    assert float(loss) == pytest.approx(total / 3, rel=1e-4)
    assert torch.allclose(teacher_sims, F.normalize(t, dim=1) @ bank_t.T)


def test_an_override_sets_one_element_of_the_teacher_list():
    cfg = load_config("demo/compress", ["method.teachers.0.path=/t.ckpt", "optim.lr=0.2"])
    assert cfg.method.teachers[0].path == "/t.ckpt" and cfg.method.teachers[0].part == "target"
    with pytest.raises(ConfigError, match="'method.teachers.0.pth=x'.*pth"):
        load_config("demo/compress", ["method.teachers.0.pth=x"])
    with pytest.raises(ConfigError, match="method.teachers.0.part does not accept 'bad'"):
        load_config("demo/compress", ["method.teachers.0.part=bad"])


def test_heads_official4_and_linear2_layouts():
    official = simreg_head("official4", 8, 5)
    kinds = [type(m).__name__ for m in official]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"] * 2
    shapes = [(m.in_features, m.out_features) for m in official if isinstance(m, nn.Linear)]
    assert shapes == [(8, 16), (16, 8), (8, 16), (16, 5)]
    linear = simreg_head("linear2", 8, 5)
    assert [type(m).__name__ for m in linear] == ["Linear", "Linear"]


def test_one_queue_equals_isd_loss_with_the_frozen_teacher(teacher):
    cfg = distill_config("compress", teacher, ["method.variant=1q", "method.bank_size=24"])
    model = build_method(cfg).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    index = torch.arange(6)
    loss, _ = model.compute_loss([x], torch.zeros(6, dtype=torch.long), index)
    frozen = build_teacher(TeacherConfig(kind="backbone", arch="tiny_cnn", path=str(teacher)))
    t = F.normalize(frozen(x, index), dim=1)
    q = F.normalize(model.to_teacher(model.project(x)), dim=1)
    bank = model.bank.embeddings
    m = cfg.method
    expected = isd_loss(q @ bank.T, t @ bank.T, m.student_temperature, m.teacher_temperature)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert model.bank.dim == 128 and model.to_teacher.in_features == 16  # teacher, projector
    bound = 1 / math.sqrt(128 / 3)  # uniform_cmc: not normalised rows within +-1/sqrt(D/3)
    assert float(bank.abs().max()) <= bound and float(bank.abs().max()) > 0.99 * bound
    assert float(bank.norm(dim=1).std()) > 0.01  # rows of norm about 1, not normalised
    assert int(model.bank.num_seen) == 0  # the anchors exclude this batch: written after the step
    model.flush_enqueue()
    assert int(model.bank.num_seen) == 6 and torch.equal(model.bank.embeddings[:6], t)


def test_resuming_with_a_changed_teacher_is_refused(teacher):
    model = build_method(distill_config("simreg", teacher))
    saved = {}
    model.on_save_checkpoint(saved)
    model.on_load_checkpoint(saved)  # the same teacher: accepted
    saved["ssl_lib"]["teacher_fingerprints"] = ["0" * 64]
    with pytest.raises(CheckpointError, match="teacher's files changed"):
        model.on_load_checkpoint(saved)


def test_map_teacher_keys_is_strict_and_names_first_keys():
    expected = nn.Linear(2, 3).state_dict()
    state = {"module.encoder_q.weight": torch.zeros(3, 2), "module.encoder_q.bias": torch.zeros(3)}
    mapped = map_teacher_keys(
        {**state, "module.encoder_k.weight": 0}, expected, "module.encoder_q.", [], "f.pt"
    )
    assert set(mapped) == {"weight", "bias"}
    with pytest.raises(CheckpointError) as err:
        map_teacher_keys(state, expected, "module.", [], "f.pt")
    message = str(err.value)
    assert "\n" not in message and "f.pt" in message
    assert "first 'weight'" in message and "first 'encoder_q.weight'" in message
    with pytest.raises(CheckpointError, match="shape"):
        map_teacher_keys(
            {"weight": torch.zeros(2, 2), "bias": torch.zeros(3)}, expected, "", [], "f.pt"
        )


def test_teacher_stays_frozen_unsaved_and_out_of_the_optimiser(teacher, tmp_path):
    before = torch.load(teacher)
    seen = {}

    class Inspect(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            (t,) = pl_module.teachers()
            seen["training"] = t.training or t.net.training
            seen["grad"] = any(p.requires_grad for p in t.parameters())
            ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen["in_optimiser"] = any(id(p) in ids for p in t.parameters())
            seen["weights"] = {k: v.clone() for k, v in t.net.state_dict().items()}

    cfg = distill_config("simreg", teacher, [f"run.output_dir={tmp_path}", "trainer.max_steps=3"])
    run_dir = train(cfg, callbacks=[Inspect()])
    assert seen["training"] is False and not seen["grad"] and not seen["in_optimiser"]
    assert before.keys() == seen["weights"].keys()
    assert all(torch.equal(before[k], seen["weights"][k]) for k in before)  # bit-identical
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any("teacher" in k or k.startswith("net.") for k in ckpt["state_dict"])
    assert len(ckpt["ssl_lib"]["teacher_fingerprints"][0]) == 64
    saved = OmegaConf.load(run_dir / "config.yaml").method.teachers[0]
    assert saved.input_norm == "imagenet" and saved.dim == 128
    teacher_moved = tmp_path / "gone.pt"
    teacher.rename(teacher_moved)
    try:  # the student evaluates without its teacher's files (dim is in the config)
        assert load_method(str(run_dir / "checkpoints" / "last.ckpt"))(
            torch.randn(2, 3, 32, 32)
        ).shape == (2, 128)
    finally:
        teacher_moved.rename(teacher)


def test_cache_round_trip_reads_rows_through_a_memmap(teacher, tmp_path):
    spec = TeacherConfig(kind="backbone", arch="tiny_cnn", path=str(teacher))
    online = build_teacher(spec)
    cfg = distill_config("simreg", teacher)
    out = write_cache(online, cfg.data, tmp_path / "cache", progress=False)
    cache = TeacherCache(out)
    assert isinstance(cache._features, np.memmap)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "float16" and meta["teacher"]["fingerprint"] == online.fingerprint
    assert "CenterCrop" in meta["transform"]
    ds = IndexedDataset(build_base_dataset(cfg.data), eval_transform(32))
    index = torch.tensor([5, 0, 63])
    images = torch.stack([ds[int(i)][0] for i in index])
    torch.testing.assert_close(cache.rows(index), online(images, index), rtol=2e-3, atol=2e-3)
    cached = build_teacher(TeacherConfig(**{**vars(spec), "cache": str(out)}))
    assert cached.net is None and cached.dim == 128
    with pytest.raises(ConfigError, match="another dataset.*first difference at index 0"):
        cache.check_dataset([f"synthetic/9/{i}" for i in range(64)], "method.teachers.0.cache")
    other = write_tiny_teacher(tmp_path / "other.pt", seed=3)
    with pytest.raises(CheckpointError, match="written by another teacher"):
        build_teacher(
            TeacherConfig(kind="backbone", arch="tiny_cnn", path=str(other), cache=str(out))
        )


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl-lib: error: ") and "\n" not in err
    return err


def test_bad_teachers_are_one_line_errors_before_any_run_folder(teacher, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    cfg = tiny_config("compress", method={"bank_size": 32})
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    out = tmp_path / "runs"
    common = ["train", str(recipe), f"run.output_dir={out}"]
    missing = tmp_path / "missing.pt"
    assert "does not exist" in _error([*common, teacher_override(missing)], capsys)
    wrong = tmp_path / "wrong.pt"
    torch.save({f"module.{k}": v for k, v in torch.load(teacher).items()}, wrong)
    assert "first 'module.stages.0.0.weight'" in _error([*common, teacher_override(wrong)], capsys)
    one_q = [*common, teacher_override(teacher), "method.variant=1q", "method.linear_map=false"]
    assert "128-d" in _error(one_q + ["model.projector.out_dim=16"], capsys)
    # a cache written for other images
    cache_dir = tmp_path / "cache"
    spec = TeacherConfig(kind="backbone", arch="tiny_cnn", path=str(teacher))
    small = config_from_dict(tiny_config("byol", data={"synthetic": {"num_samples": 32}}))
    write_cache(build_teacher(spec), small.data, cache_dir, progress=False)
    cached = f"method.teachers.0.cache={cache_dir}"
    assert "another dataset" in _error([*common, teacher_override(teacher), cached], capsys)
    assert not out.exists()  # nothing written


def test_cache_features_then_train_from_the_cache_commands(teacher, tmp_path):
    spec = tmp_path / "teacher.yaml"
    spec.write_text(f"kind: backbone\narch: tiny_cnn\npath: {teacher}\n")
    recipe = tmp_path / "compress.yaml"
    cfg = tiny_config("compress", method={"bank_size": 32}, model={"projector": None})
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:  # the command's entry point, in-process
        main(["cache-features", str(spec), str(recipe), str(cache), "-q"])
    assert exit_info.value.code == 0
    assert (cache / "features.f16").stat().st_size == 64 * 128 * 2
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                str(recipe),
                teacher_override(teacher),
                f"method.teachers.0.cache={cache}",
                "trainer.max_steps=2",
                f"run.output_dir={tmp_path / 'runs'}",
                "-q",
            ]
        )
    assert exit_info.value.code == 0
    ckpt = torch.load(tmp_path / "runs" / "test" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and "student_bank.embeddings" in ckpt["state_dict"]


def test_a_vit_teacher_is_rebuilt_at_the_size_it_was_trained_at(tmp_path):
    pytest.importorskip("timm")
    cfg = config_from_dict(
        tiny_config("byol", model={"backbone": "vit_micro_p8"}, data={"image_size": 40}),
        [f"run.output_dir={tmp_path}", "trainer.max_steps=1"],
    )
    ckpt = train(cfg) / "checkpoints" / "last.ckpt"
    spec = TeacherConfig(kind="ssl_lib", path=str(ckpt), part="backbone")
    teacher = build_teacher(spec)  # at the default 32 px its position embeddings would not fit
    assert teacher(torch.randn(2, 3, 40, 40), torch.arange(2)).shape == (2, 32)
