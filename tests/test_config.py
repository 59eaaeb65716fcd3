"""Recipe loading, inheritance, overrides and the errors for bad recipes."""

from __future__ import annotations

import pytest

from ssl_lib.config import (
    ConfigError,
    list_recipes,
    load_config,
    load_defend_config,
    load_eval_config,
)


def write(path, text):
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads():
    names = list_recipes("train")
    assert "demo/byol" in names and "imagenet/byol" in names and "cifar10/byol" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.method.name
    eval_names = list_recipes("eval")
    assert "eval/knn_umbc" in eval_names and "eval/cifar10_linear_cached" in eval_names
    defend_names = list_recipes("defend")
    assert "defend/patchsearch" in defend_names
    assert sorted(names + eval_names + defend_names + list_recipes("poison")) == list_recipes()
    for name in eval_names:
        cfg = load_eval_config(name)
        assert cfg.knn.ks and cfg.linear.protocol
    for name in defend_names:
        cfg = load_defend_config(name)
        assert cfg.patchsearch.num_clusters and cfg.filter.ensemble


def test_eval_recipe_errors_name_file_and_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "base: x.yaml\nknn: {kss: [1]}\n")
    write(tmp_path / "x.yaml", "linear: {protocol: cached}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'knn.kss'. Did you mean 'ks'"):
        load_eval_config(bad)
    ok = write(tmp_path / "ok.yaml", "knn: {ks: [1, 20]}\n")
    assert load_eval_config(ok, ["knn.ks=[5]"]).knn.ks == [5]
    with pytest.raises(ConfigError, match="linear.protocol.*'umbc'"):
        load_eval_config(ok, ["linear.protocol=umbcc"])
    with pytest.raises(ConfigError, match="features.source"):
        load_eval_config(ok, ["features.source=block"])
    with pytest.raises(ConfigError, match="invalid value for 'linear.epochs'"):
        load_eval_config(ok, ["linear.epochs=many"])


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "method: {name: byol}\noptim: {lr: 0.5, momentum: 0.8}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\noptim: {lr: 0.1}\n")
    cfg = load_config(child, ["optim.weight_decay=0.01", "method.symmetric=true"])
    assert cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.8
    assert cfg.optim.weight_decay == 0.01 and cfg.method.symmetric is True


def test_base_may_name_a_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither a local file nor the checkout's folders can answer
    mine = write(tmp_path / "mine.yaml", "base: imagenet/msf\nmethod: {bank_size: 256000}\n")
    cfg = load_config(mine)
    assert cfg.method.name == "msf" and cfg.method.bank_size == 256000
    assert cfg.optim.schedule == "cosine_epoch"  # from imagenet/_umbc.yaml, the shipped base's base
    # a file next to the recipe wins over a shipped recipe of the same name
    (tmp_path / "imagenet").mkdir()
    write(tmp_path / "imagenet" / "msf.yaml", "method: {name: msf, k: 7}\n")
    assert load_config(mine).method.k == 7 and cfg.method.k == 5
    missing = write(tmp_path / "missing.yaml", "base: imagenet/msff\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: base recipe 'imagenet/msff' not found"):
        load_config(missing)


def test_unknown_key_names_file_and_close_match(tmp_path):
    bad = write(tmp_path / "bad.yaml", "method: {name: byol}\noptim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "optim.lrr" in msg and "'lr'" in msg


def test_unknown_method_key_uses_method_schema(tmp_path):
    bad = write(tmp_path / "bad.yaml", "method: {name: byol, symetric: true}\n")
    with pytest.raises(ConfigError, match="symmetric"):
        load_config(bad)


def test_wrong_type(tmp_path):
    bad = write(tmp_path / "bad.yaml", "method: {name: byol}\noptim: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"optim\.lr.*fast"):
        load_config(bad)


def test_override_errors_name_the_command_line(tmp_path):
    ok = write(tmp_path / "ok.yaml", "method: {name: byol}\n")
    with pytest.raises(ConfigError, match="command-line override.*trainer.max_epoch"):
        load_config(ok, ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ok, ["optim.lr"])


def test_yaml_syntax_error_has_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "method:\n  name: byol\noptim: {lr: [0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert f"{bad}:4" in str(err.value) or f"{bad}:3" in str(err.value)
    assert "YAML syntax error" in str(err.value)


def test_unknown_names_list_choices(tmp_path):
    cfg = write(tmp_path / "c.yaml", "method: {name: byl}\n")
    with pytest.raises(ConfigError, match="Did you mean 'byol'.*Available: .*byol"):
        load_config(cfg)
    cfg = write(tmp_path / "c.yaml", "method: {name: byol}\nmodel: {backbone: resnet19}\n")
    with pytest.raises(ConfigError, match="model.backbone.*resnet18.*Available"):
        load_config(cfg)
    cfg = write(tmp_path / "c.yaml", "method: {name: byol}\ndata: {views: [strong, waek]}\n")
    with pytest.raises(ConfigError, match="'weak'"):
        load_config(cfg)
    cfg = write(tmp_path / "c.yaml", "method: {name: byol}\noptim: {name: adam}\n")
    with pytest.raises(ConfigError, match=r"optim.name.*\['sgd', 'lars'\]"):
        load_config(cfg)


def test_missing_recipe_suggests(tmp_path):
    with pytest.raises(ConfigError, match="demo/byol"):
        load_config("demo/byl")


def test_section_checks_name_the_file_that_set_the_key(tmp_path):
    write(tmp_path / "base.yaml", "method: {name: cmsf_2q, k: 4, k_prime: 6}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nmethod: {k: 8}\n")
    with pytest.raises(ConfigError) as err:  # k_prime (from base.yaml) < k (from child.yaml)
        load_config(child)
    assert str(err.value).startswith(f"{child}: method.k_prime must lie in [method.k=8")
    with pytest.raises(ConfigError, match=r"^command-line override: method.k must be >= 1, got 0"):
        load_config(child, ["method.k=0"])
    with pytest.raises(ConfigError, match=r"^command-line override: trainer.max_epochs must be"):
        load_config(child, ["method.k=4", "trainer.max_epochs=0"])
    sup = write(tmp_path / "sup.yaml", "method: {name: cmsf_sup, unwritten_entries: never}\n")
    with pytest.raises(ConfigError, match=rf"^{sup}: method.unwritten_entries does not accept"):
        load_config(sup)
    eval_recipe = write(tmp_path / "eval.yaml", "knn: {ks: [0, 5]}\n")
    with pytest.raises(ConfigError, match=rf"^{eval_recipe}: knn.ks must be positive integers"):
        load_eval_config(eval_recipe)
