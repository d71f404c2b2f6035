"""The throwaway team server of the end-to-end tests: `make team-server` in a temporary TEAM_DIR on
free loopback ports, with users, stopped by `make team-server-stop`; and how the tests log in to it.
The make targets run as users run them, with this interpreter's environment standing in for .venv
(`make -o .venv/bin/.installed`)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from mnist_gan.store import EXPERIMENT
from mnist_gan.team_server import Folder, postgres_bin
from tests.helpers import REPO, free_port, pipeline_env, run

MAKE = ["make", "-s", "-o", ".venv/bin/.installed"]
LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
EDITOR, READER = ("alice", "alice-password-1"), ("bob", "bob-password-12")


@dataclass
class TeamServer:
    url: str
    folder: Folder
    pg_port: int
    make_vars: list[str]
    experiment_id: str

    @property
    def admin(self) -> tuple[str, str]:
        return "admin", self.folder.admin_password.read_text().strip()


def make(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([*MAKE, *args], cwd=REPO, env=pipeline_env(), capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, f"make {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def login_env(url: str, user: tuple[str, str]) -> dict[str, str]:
    return pipeline_env() | {"MLFLOW_TRACKING_URI": url, **dict(zip(LOGIN, user, strict=True))}


def log_in(monkeypatch: pytest.MonkeyPatch, url: str, user: tuple[str, str]) -> MlflowClient:
    """This process's MLflow client (and the project's store) as `user` on `url`."""
    for name, value in zip(LOGIN, user, strict=True):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    return MlflowClient(url)


def psql_command(server: TeamServer, database: str) -> tuple[list[str], dict[str, str]]:
    """PostgreSQL's own client on the server's database, logged in as the server is (its pgpass)."""
    return ([str(postgres_bin(server.folder) / "psql"), "-h", "127.0.0.1", "-p", str(server.pg_port),
             "-U", "mlflow", "-d", database], pipeline_env() | {"PGPASSFILE": str(server.folder.pgpass)})


def psql(server: TeamServer, database: str, query: str) -> str:
    """One query's result."""
    command, env = psql_command(server, database)
    return run([*command, "-tAc", query], REPO, env).strip()


def running_pids(folder: Folder) -> list[int]:
    """The pids of the folder's mlflow server and PostgreSQL postmaster (from their pid files)."""
    files = [folder.mlflow_pid, folder.cluster / "postmaster.pid"]
    return [int(f.read_text().split()[0]) for f in files if f.exists()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def running_team_server() -> Iterator[TeamServer]:
    """`make team-server` in a fresh TEAM_DIR on free ports; users alice (EDIT on the experiment)
    and bob (READ) created by the admin as docs/team.md does. Stopped afterwards, both processes
    (a module-scoped fixture of each module that needs it)."""
    # the postgres user must reach the cluster: pytest's tmp dirs (/tmp/pytest-of-root) are 0700
    root = Path(tempfile.mkdtemp(prefix="team-server-"))
    root.chmod(0o755)
    folder = Folder(root / "team")
    port, pg_port = free_port(), free_port()
    make_vars = [f"TEAM_DIR={folder.root}", f"TEAM_PORT={port}", f"TEAM_PG_PORT={pg_port}"]
    url = f"http://127.0.0.1:{port}"
    try:
        started = make("team-server", *make_vars, timeout=240).stdout
        assert f"team server: {url}" in started and str(folder.admin_password) in started, started
        with pytest.MonkeyPatch.context() as monkeypatch:
            log_in(monkeypatch, url, ("admin", folder.admin_password.read_text().strip()))
            experiment_id = MlflowClient(url).get_experiment_by_name(EXPERIMENT).experiment_id
            auth = get_app_client("basic-auth", tracking_uri=url)
            for (name, password), permission in ((EDITOR, "EDIT"), (READER, "READ")):
                auth.create_user(name, password)
                auth.grant_user_permission(name, "experiment", experiment_id, permission)
        yield TeamServer(url, folder, pg_port, make_vars, experiment_id)
    finally:
        pids = running_pids(folder)
        stopped = make("team-server-stop", *make_vars, check=False)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        still = [pid for pid in pids if alive(pid)]
        shutil.rmtree(root, ignore_errors=True)
    assert stopped.returncode == 0 and "stopped mlflow server" in stopped.stdout, stopped.stderr
    assert len(pids) == 2 and not still, f"still running: {still}"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)
