"""ssl_lib.files: the one place for atomic writes, unused names and run folders."""

from __future__ import annotations

import pytest

from ssl_lib.files import atomic_write, atomic_write_text, run_folder_of, unused_path


def test_unused_path_never_returns_an_existing_name(tmp_path):
    result = tmp_path / "knn.json"
    assert unused_path(result) == result
    result.write_text("{}")
    (tmp_path / "knn_1.json").write_text("{}")
    assert unused_path(result) == tmp_path / "knn_2.json"
    run = tmp_path / "run.v2"
    run.mkdir()
    assert unused_path(run, keep_suffix=False) == tmp_path / "run.v2_1"


def test_run_folder_of_a_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    assert run_folder_of(ckpt) == tmp_path / "run"
    assert run_folder_of(tmp_path / "elsewhere" / "x.ckpt") == tmp_path / "elsewhere"
    monkeypatch.chdir(ckpt.parent)  # a bare file name inside checkpoints/
    assert run_folder_of("last.ckpt") == tmp_path / "run"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
