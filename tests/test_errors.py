"""Every stage and the command line end a user's mistake in one line and exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mnist_gan.errors import UserError, run_stage
from tests.helpers import REPO

STAGES = sorted(path.name for path in (REPO / "stages").glob("*.py"))


@pytest.mark.parametrize("script", STAGES)
def test_each_stage_reports_a_bad_param_in_one_line(tmp_path, script):
    params = yaml.safe_load((REPO / "params.yaml").read_text()) | {"lr": -1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, str(REPO / "stages" / script)], cwd=tmp_path, capture_output=True,
                          text=True, check=False, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert done.returncode == 2 and done.stdout == ""
    message = "params.yaml: 'lr' = -1.0 is invalid: must be in (0, 1), e.g. 0.0002"
    assert done.stderr.splitlines() == [f"ERROR {REPO / 'stages' / script}: {message}"]


def test_run_stage_leaves_a_bug_its_traceback():
    def buggy() -> None:
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        run_stage(buggy)


def test_run_stage_exits_2_on_a_user_error(capsys):
    def refused() -> None:
        raise UserError("what is wrong; how to fix it")

    with pytest.raises(SystemExit) as exit_:
        run_stage(refused)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(": what is wrong; how to fix it\n")
