"""`python -m mnist_gan generate` from a file, a run and a registry alias; `promote` moves the alias
only on improvement. A real SQLite-backed MLflow store in a temp dir."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_gan.__main__ import main
from mnist_gan.mlflow_model import log_generator
from mnist_gan.models import build_models, load_model, save_model
from mnist_gan.registry import ALIAS, REGISTERED_MODEL, promote
from tests.helpers import use_mlflow_store

CPU = torch.device("cpu")


def _generator_file(path: Path, model: str, seed: int) -> Path:
    torch.manual_seed(seed)
    generator, _ = build_models(model, 100, 8, 0.0, CPU, codes=10 if model == "selfcond" else 0)
    save_model(generator, path)
    return path


def _npy(capsys, *args: str) -> np.ndarray:
    assert main(["generate", *args]) == 0, capsys.readouterr().err
    return np.load(args[args.index("--out") + 1])


@pytest.mark.parametrize("model", ["mlp", "cgan"])
def test_generate_from_a_file_is_reproducible(tmp_path, capsys, model):
    path = str(_generator_file(tmp_path / "g.pt", model, seed=0))
    out = str(tmp_path / "s.npy")
    first = _npy(capsys, "--model", path, "-n", "10", "--seed", "3", "--out", out)
    again = _npy(capsys, "--model", path, "-n", "10", "--seed", "3", "--out", out)
    other = _npy(capsys, "--model", path, "-n", "10", "--seed", "4", "--out", out)
    assert first.shape == (10, 28, 28) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert main(["generate", "--model", path, "-n", "9", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size == (3 * 30 + 2, 3 * 30 + 2)  # 3x3 tiles, 2 px padding
    assert "wrote" in capsys.readouterr().out


def test_generate_a_digit_from_a_conditional_model(tmp_path, capsys):
    path = str(_generator_file(tmp_path / "g.pt", "cgan", seed=0))
    sevens = _npy(capsys, "--model", path, "--digit", "7", "-n", "4", "--out", str(tmp_path / "7.npy"))
    ones = _npy(capsys, "--model", path, "--digit", "1", "-n", "4", "--out", str(tmp_path / "1.npy"))
    assert not np.array_equal(sevens, ones)  # same z, different labels


def test_generate_a_code_of_a_selfcond_model(tmp_path, capsys):
    path = str(_generator_file(tmp_path / "g.pt", "selfcond", seed=0))
    threes = _npy(capsys, "--model", path, "--code", "3", "-n", "4", "--out", str(tmp_path / "3.npy"))
    assert "4 samples (code 3, seed 0)" in capsys.readouterr().out
    again = _npy(capsys, "--model", path, "--code", "3", "-n", "4", "--out", str(tmp_path / "3.npy"))
    other = _npy(capsys, "--model", path, "--code", "4", "-n", "4", "--out", str(tmp_path / "4.npy"))
    assert np.array_equal(threes, again) and not np.array_equal(threes, other)  # same z, other code


@pytest.mark.parametrize("model, args, message", [
    ("selfcond", ["--digit", "7"], "unconditional (model mlp or selfcond): it cannot be asked for a digit"),
    ("selfcond", ["--code", "10"], "code 10 is out of range: 0 to 9"),
    ("selfcond", ["--code", "1", "--digit", "1"], "ask for a digit or a code, not both"),
    ("cgan", ["--code", "1"], "this generator has no codes (model mlp or cgan): only model=selfcond"),
    ("mlp", ["--code", "1"], "this generator has no codes (model mlp or cgan)"),
])
def test_generate_asked_for_what_the_model_cannot_draw(tmp_path, capsys, model, args, message):
    path = str(_generator_file(tmp_path / "g.pt", model, seed=0))
    assert main(["generate", "--model", path, *args, "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("args, message", [
    (["--digit", "7"], "unconditional (model mlp or selfcond): it cannot be asked for a digit"),
    (["--out", "samples.jpg"], "must end in .png (a grid) or .npy"),
    (["--model", "nowhere.pt"], "nowhere.pt: no such file"),
    (["--model", "models/discriminator.pt"], "holds a discriminator, not a generator"),
])
def test_generate_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _generator_file(tmp_path / "models" / "generator.pt", "selfcond", seed=0)
    save_model(build_models("selfcond", 100, 8, 0.0, CPU)[1], tmp_path / "models" / "discriminator.pt")
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "samples.jpg").exists()


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    return use_mlflow_store(tmp_path, monkeypatch)


def _logged_run(tmp_path: Path, seed: int, fid: float | None) -> tuple[str, Path]:
    """A run like the train + evaluate stages leave: the logged generator and eval/fid."""
    path = _generator_file(tmp_path / f"generator-{seed}" / "generator.pt", "cgan", seed)
    with mlflow.start_run() as run:
        log_generator(load_model(path, CPU), path)
        if fid is not None:
            mlflow.log_metric("eval/fid", fid)
    return run.info.run_id, path


def test_promote_moves_the_champion_only_on_improvement_and_generate_follows(store, tmp_path, capsys):
    first, first_file = _logged_run(tmp_path, seed=1, fid=20.0)
    worse, _ = _logged_run(tmp_path, seed=2, fid=25.0)
    better, better_file = _logged_run(tmp_path, seed=3, fid=5.0)
    unevaluated, _ = _logged_run(tmp_path, seed=4, fid=None)

    def champion_run() -> str:
        return store.get_model_version_by_alias(REGISTERED_MODEL, ALIAS).run_id

    assert promote(first).promoted and champion_run() == first
    result = promote(worse)
    assert not result.promoted and "does not beat" in result.message and champion_run() == first
    result = promote(first)  # already the champion: nothing registered twice
    assert not result.promoted and "is already the champion" in result.message
    assert main(["promote", "--run", better]) == 0
    assert "promoted: version 3" in capsys.readouterr().out and champion_run() == better
    assert main(["promote", "--run", unevaluated]) == 2
    assert "has no eval/fid: run the evaluate stage" in capsys.readouterr().err
    assert [v.version for v in store.search_model_versions(f"name='{REGISTERED_MODEL}'")] == [3, 2, 1]

    # the alias, the run URI and the file give the same images for the same seed
    args = ["-n", "6", "--digit", "7", "--seed", "5"]
    by_alias = _npy(capsys, "--model", f"models:/{REGISTERED_MODEL}@{ALIAS}", *args,
                    "--out", str(tmp_path / "a.npy"))
    by_run = _npy(capsys, "--model", f"runs:/{better}", *args, "--out", str(tmp_path / "r.npy"))
    by_file = _npy(capsys, "--model", str(better_file), *args, "--out", str(tmp_path / "f.npy"))
    assert np.array_equal(by_alias, by_run) and np.array_equal(by_run, by_file)
    assert not np.array_equal(by_file, _npy(capsys, "--model", str(first_file), *args,
                                            "--out", str(tmp_path / "old.npy")))
    assert main(["generate", "--model", "runs:/0123456789abcdef", "--out", "x.png"]) == 2
    assert "cannot download runs:/0123456789abcdef/generator" in capsys.readouterr().err
