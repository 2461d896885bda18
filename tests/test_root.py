"""Where data and caches live: --data-root > METALAB_DATA > ~/.cache/metalab."""

from __future__ import annotations

from pathlib import Path

from metalab.data.root import cache_dir, data_root


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("METALAB_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("METALAB_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == Path(tmp_path / "home" / ".cache" / "metalab")


def test_cache_dir_is_separate_and_created(monkeypatch, tmp_path):
    monkeypatch.setenv("METALAB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
