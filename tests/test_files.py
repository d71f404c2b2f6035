"""Atomic outputs: a writer that fails or is killed mid-write leaves the previous file as it was."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_gan import files
from mnist_gan.files import atomic_path, read_json, write_json


def test_error_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"p_real": 0.5})

    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        tmp.write_text('{"p_real": 0.')
        raise RuntimeError("disk full")
    assert read_json(path) == {"p_real": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_writer_killed_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "generator.pt"
    path.write_bytes(b"previous weights")
    writer = (
        "import sys, time\n"
        "from mnist_gan.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'half of the new wei')\n"
        "        f.flush()\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert path.read_bytes() == b"previous weights"
    # what a kill leaves: the hidden temporary file, under a name nothing reads
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".generator.pt.") and leftovers[0].endswith(".tmp")


def test_success_replaces_the_file_with_ordinary_permissions(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_new_content_appears_by_one_rename_of_a_synced_sibling(tmp_path, monkeypatch):
    """The mechanism, not only the result: readers see the old file until a single rename of a
    flushed temporary file in the same folder (so on the same filesystem) puts the new one there."""
    path = tmp_path / "eval.json"
    path.write_text("old")
    old_inode = path.stat().st_ino
    calls = []
    replace, fsync = os.replace, files._fsync

    def recorded_replace(src, dst):
        calls.append(("replace", Path(src), Path(dst)))
        replace(src, dst)

    def recorded_fsync(target):
        calls.append(("fsync", Path(target)))
        fsync(target)

    monkeypatch.setattr(os, "replace", recorded_replace)
    monkeypatch.setattr(files, "_fsync", recorded_fsync)
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
        assert path.read_text() == "old" and calls == []
    assert calls == [("fsync", tmp), ("replace", tmp, path), ("fsync", tmp_path)]
    assert path.read_text() == "new" and path.stat().st_ino != old_inode


def test_json_is_indented_sorted_and_ends_with_a_newline(tmp_path):
    """The form DVC shows in diffs and reviews read: stable key order, one key per line."""
    path = tmp_path / "eval.json"
    write_json(path, {"recall": 0.5, "fid": 2.0})
    assert path.read_text() == '{\n  "fid": 2.0,\n  "recall": 0.5\n}\n'
