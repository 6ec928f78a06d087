"""node/datadir.py: one lock per data dir, and everything in it private."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from node.datadir import DataDir, DataDirLocked, write_private


def test_a_data_dir_is_created_private_and_an_open_one_is_tightened(tmp_path, caplog):
    fresh = DataDir(tmp_path / "fresh").open()
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700
    fresh.close()

    old = tmp_path / "old"
    (old / "sub").mkdir(parents=True)
    for path, mode in ((old, 0o755), (old / "sub", 0o775)):
        os.chmod(path, mode)
    for name in ("raft.journal", "sub/archive.db"):
        (old / name).write_bytes(b"x")
        os.chmod(old / name, 0o644)
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o644)
    (old / "link").symlink_to(outside)
    with caplog.at_level(logging.WARNING, "colonies.node"):
        d = DataDir(old).open()
    try:
        modes = {str(p.relative_to(old)): p.lstat().st_mode & 0o777 for p in old.rglob("*")}
        assert old.stat().st_mode & 0o777 == 0o700
        assert modes["sub"] == 0o700
        assert modes["raft.journal"] == modes["sub/archive.db"] == modes["colonyd.lock"] == 0o600
        assert outside.stat().st_mode & 0o777 == 0o644  # a symlink's target is not ours
        assert "made 2 dir(s) 0700 and 2 file(s) 0600" in caplog.text
        with pytest.raises(DataDirLocked, match="in use"):
            DataDir(old).open()
    finally:
        d.close()


def test_private_files_are_whole_and_0600(tmp_path: Path):
    path = tmp_path / "cluster.json"
    (tmp_path / "cluster.json.tmp").write_text("left over")
    os.chmod(tmp_path / "cluster.json.tmp", 0o666)
    write_private(path, "{}\n", sync=True)
    assert path.read_text() == "{}\n" and path.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "cluster.json.tmp").exists()
