"""params.yaml is DVC's composition of conf/ (Hydra): the committed one cannot drift from it, and
`make repro` (composition.sync) writes it as `dvc exp run` would, without dropping a hand edit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mnist_gan.composition import CompositionError, compose, differences, sync
from tests.helpers import REPO

GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@t"]


def drift(root: Path) -> list[str]:
    """How params.yaml differs from the composition of conf/ (`params.yaml value -> conf/ value`)."""
    return differences((root / "params.yaml").read_text(), compose(root))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """conf/, params.yaml and .dvc/config of the repo, committed in a git repo of their own."""
    for name in ("conf", ".dvc"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    for cmd in (["init", "-q"], ["add", "-A"], [*GIT_USER, "commit", "-qm", "init"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_committed_params_are_the_composition_of_conf():
    assert drift(REPO) == []
    assert (REPO / "params.yaml").read_text() == compose(REPO)  # byte for byte: what `dvc exp run` writes


def test_drift_is_found_when_either_side_is_edited_alone(project):
    edit(project / "conf/model/mlp.yaml", "lr: 0.0002", "lr: 0.0003")
    assert drift(project) == ["lr: 0.0002 -> 0.0003"]
    subprocess.run(["git", "checkout", "--", "conf"], cwd=project, check=True)
    edit(project / "params.yaml", "n_samples: 10000", "n_samples: 500")
    assert drift(project) == ["eval.n_samples: 500 -> 10000"]


def test_sync_writes_what_conf_composes_after_an_edit_of_conf(project):
    assert sync(project) == "params.yaml is the composition of conf/"
    edit(project / "conf/model/mlp.yaml", "epochs: 200", "epochs: 20")
    assert sync(project) == "params.yaml composed from conf/: epochs: 200 -> 20"
    assert drift(project) == [] and "\nepochs: 20\n" in (project / "params.yaml").read_text()


def test_sync_refuses_to_drop_an_uncommitted_edit_of_params_yaml(project):
    edit(project / "params.yaml", "\nlr: 0.0002\n", "\nlr: 0.0001\n")
    before = (project / "params.yaml").read_text()
    with pytest.raises(CompositionError) as error:
        sync(project)
    message = str(error.value)
    assert "\n" not in message and "(lr: 0.0001 -> 0.0002 in conf/)" in message
    assert "make the change in conf/, or `git checkout HEAD -- params.yaml`" in message
    assert (project / "params.yaml").read_text() == before


def test_a_conf_that_does_not_compose_is_one_line(project):
    with pytest.raises(CompositionError, match=r"^conf/ does not compose with \['lrr=1'\]: Could not "
                                               r"override 'lrr'\. To append to your config use \+lrr=1"):
        compose(project, ["lrr=1"])
    edit(project / ".dvc/config", "enabled = true", "enabled = false")
    with pytest.raises(CompositionError, match="hydra is not enabled; run `dvc config hydra.enabled true`"):
        compose(project)
