"""`make team-server`: the team's MLflow tracking server, with logins, on a PostgreSQL of its own.

Everything lives in one folder (team-server/, or TEAM_DIR): the PostgreSQL cluster (postgres/),
the artifacts the server stores for its clients (artifacts/), logs, pid files and the secrets,
each secret in a file of mode 0600:

- pgpass: the password of the database role `mlflow`, in libpq's format; the server reads it
  through PGPASSFILE, so no password is on a command line or in a URI;
- secret-key: MLFLOW_FLASK_SERVER_SECRET_KEY, the basic-auth app's CSRF key (one for all workers);
- admin-password: the first password of the MLflow user `admin`, written on the first start unless
  MLFLOW_AUTH_ADMIN_PASSWORD gives one. MLflow reads it only to create that user: after the admin
  changes the password (docs/team.md) the file is stale.

Three databases: `mlflow` (experiments, runs, models), `mlflow_auth` (users, permissions) and
`optuna` (the studies of `python -m mnist_gan tune`, which connects as `mlflow` with PGPASSFILE).
Users get READ on everything by default (MLflow's default_permission); the first start creates
the `mnist-gan` experiment as admin, so that no user owns it, and the admin grants EDIT on it
per user. PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

from mnist_gan.errors import UserError
from mnist_gan.store import EXPERIMENT

POSTGRES_ROOT = Path("/usr/lib/postgresql")  # Debian's layout: <version>/bin/{initdb,pg_ctl}
DB_ROLE = "mlflow"
TRACKING_DB, AUTH_DB, OPTUNA_DB = "mlflow", "mlflow_auth", "optuna"
ADMIN = "admin"
START_TIMEOUT = 120  # seconds for `mlflow server` to answer /health (its workers import MLflow)


class Folder:
    """The paths of a team server's folder."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.postgres = self.root / "postgres"  # owned by the postgres user when run as root
        self.cluster = self.postgres / "data"
        self.postgres_log = self.postgres / "postgres.log"
        self.artifacts = self.root / "artifacts"
        self.pgpass = self.root / "pgpass"
        self.secret_key = self.root / "secret-key"
        self.admin_password = self.root / "admin-password"
        self.auth_config = self.root / "basic_auth.ini"
        self.mlflow_log = self.root / "mlflow.log"
        self.mlflow_pid = self.root / "mlflow.pid"
        self.url = self.root / "url"


# --- PostgreSQL -------------------------------------------------------------------------------------
def postgres_bin(folder: Folder) -> Path:
    """The bin/ of the cluster's PostgreSQL version, or for a new cluster of the newest installed."""
    versions = sorted((p.parent.parent for p in POSTGRES_ROOT.glob("*/bin/initdb")),
                      key=lambda p: int(p.name) if p.name.isdigit() else -1)
    if not versions:
        raise UserError(f"PostgreSQL is not installed (no {POSTGRES_ROOT}/*/bin/initdb): "
                        "apt-get update && apt-get install -y postgresql")
    version_file = folder.cluster / "PG_VERSION"
    if version_file.exists():
        version = version_file.read_text().strip()
        if not (POSTGRES_ROOT / version / "bin/pg_ctl").exists():
            raise UserError(f"the cluster in {folder.cluster} is PostgreSQL {version}, which is not "
                            f"installed (found {', '.join(v.name for v in versions)}): "
                            f"apt-get install -y postgresql-{version}")
        return POSTGRES_ROOT / version / "bin"
    return versions[-1] / "bin"


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"{what} failed: {detail[-1]}")


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")


def _secret(path: Path) -> str:
    """The secret kept in `path` (mode 0600), generated on first use."""
    if not path.exists():
        _write_secret(path, secrets.token_urlsafe(24))
    return path.read_text().strip()


def _db_password(folder: Folder) -> str:
    if not folder.pgpass.exists():
        _write_secret(folder.pgpass, f"*:*:*:{DB_ROLE}:{secrets.token_urlsafe(24)}")
    return folder.pgpass.read_text().strip().rsplit(":", 1)[1]


def _init_cluster(folder: Folder, bin_dir: Path) -> None:
    """initdb: a cluster whose only role, `mlflow`, logs in with a password, on loopback TCP only."""
    folder.postgres.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise UserError("PostgreSQL refuses to run as root, and there is no `postgres` user to run it "
                            "(Debian's postgresql package creates it)") from None
        os.chown(folder.postgres, owner.pw_uid, owner.pw_gid)
        if subprocess.run(_as_postgres(["test", "-w", str(folder.postgres)]), check=False).returncode != 0:
            raise UserError(f"the postgres user (PostgreSQL refuses to run as root) cannot reach "
                            f"{folder.root}: a parent folder is closed to it (e.g. mode 0700); "
                            "set TEAM_DIR to a folder it can reach")
    # initdb reads the password from a file the postgres user can read; removed at once
    pwfile = folder.postgres / "initdb-password"
    _write_secret(pwfile, _db_password(folder))
    try:
        if os.geteuid() == 0:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        _run(_as_postgres([str(bin_dir / "initdb"), "-D", str(folder.cluster), "-U", DB_ROLE, "-E", "UTF8",
                           "--auth=scram-sha-256", f"--pwfile={pwfile}"]), "initdb")
    finally:
        pwfile.unlink()
    # loopback TCP only: no Unix socket (its path in a deep folder can exceed the 107-byte limit);
    # room for the server's workers' connection pools
    with (folder.cluster / "postgresql.conf").open("a") as conf:
        conf.write("listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\nmax_connections = 200\n")


def _postgres_port(folder: Folder) -> int | None:
    """The port of the running cluster (postmaster.pid's fourth line), None when it is not running."""
    try:
        lines = (folder.cluster / "postmaster.pid").read_text().splitlines()
        os.kill(int(lines[0]), 0)
    except (OSError, IndexError, ValueError):
        return None
    return int(lines[3])


def _start_postgres(folder: Folder, bin_dir: Path, port: int) -> None:
    _check_port_free("127.0.0.1", port, "TEAM_PG_PORT")
    _run(_as_postgres([str(bin_dir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(folder.cluster),
                       "-l", str(folder.postgres_log), "-o", f"-p {port}"]),
         f"starting PostgreSQL (log: {folder.postgres_log})")


def _create_databases(folder: Folder, port: int) -> bool:
    """Create the databases where missing; whether the MLflow admin user exists yet."""
    import psycopg2  # only here: `team-server stop` and the pipeline never need it

    def connect(dbname: str):
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=DB_ROLE, password=_db_password(folder),
                                dbname=dbname, connect_timeout=10)
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        return closing(conn)

    with connect("postgres") as conn, conn.cursor() as cursor:
        for name in (TRACKING_DB, AUTH_DB, OPTUNA_DB):
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{name}"')
    with connect(AUTH_DB) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT to_regclass('users') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return False
        cursor.execute("SELECT 1 FROM users WHERE username = %s", (ADMIN,))
        return cursor.fetchone() is not None


# --- mlflow server ----------------------------------------------------------------------------------
def _check_port_free(host: str, port: int, variable: str) -> None:
    with socket.socket() as probe:
        # as the servers bind: only a listening socket blocks the port, not connections in TIME_WAIT
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): stop what uses it, "
                            f"or choose another port with {variable}=...") from None


def _mlflow_pid(folder: Folder) -> int | None:
    """The pid of the folder's `mlflow server`, None when it is not running (a zombie has no cmdline)."""
    try:
        pid = int(folder.mlflow_pid.read_text())
        return pid if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except (OSError, ValueError):
        return None


def _admin_request(url: str, path: str, body: dict, password: str) -> None:
    login = base64.b64encode(f"{ADMIN}:{password}".encode()).decode()
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Basic {login}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def _create_experiment(url: str, password: str) -> None:
    """The project's experiment, owned by the admin: whoever created it would own it (MANAGE)."""
    try:
        _admin_request(url, "/api/2.0/mlflow/experiments/create", {"name": EXPERIMENT}, password)
    except urllib.error.HTTPError as err:
        if "RESOURCE_ALREADY_EXISTS" not in err.read().decode(errors="replace"):
            raise UserError(f"creating experiment {EXPERIMENT} on {url} as {ADMIN} failed: "
                            f"HTTP {err.code}") from None


def _wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            raise UserError(f"mlflow server exited ({lines[-1] if lines else 'no output'}); log: {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGTERM)
    raise UserError(f"mlflow server did not answer {url}/health within {START_TIMEOUT} s; log: {log}")


def _start_mlflow(folder: Folder, host: str, port: int, pg_port: int, options: list[str],
                  admin_password: str | None) -> str:
    """`mlflow server --app-name basic-auth` on the cluster; its URL once it answers."""
    # the driver pinned in requirements.txt: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
    database = f"postgresql+psycopg2://{DB_ROLE}@127.0.0.1:{pg_port}"
    # auth_cache_ttl_seconds: without it every request pays a PBKDF2 password check (tens of ms of
    # CPU), and eight writers on two cores got ~4 requests/s in all; the price: a changed password's
    # old one keeps working for up to 30 s on the workers that did not handle the change
    folder.auth_config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database}/{AUTH_DB}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 30\n")
    env = {
        # the server's job runner (GenAI scorers, prompt optimisation: eight processes) has nothing to do here
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **os.environ,
        "PGPASSFILE": str(folder.pgpass),
        "MLFLOW_AUTH_CONFIG_PATH": str(folder.auth_config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret(folder.secret_key),
    }
    if admin_password is not None:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_password
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", host,
           "--port", str(port), "--backend-store-uri", f"{database}/{TRACKING_DB}",
           *options]
    with folder.mlflow_log.open("a") as log:
        # its own process group: stop() ends its workers too
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    folder.mlflow_pid.write_text(f"{server.pid}\n")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    folder.url.write_text(url + "\n")
    _wait_until_up(url, server, folder.mlflow_log)
    return url


def optuna_storage(pg_port: int) -> str:
    """The URL of the cluster's `optuna` database, for `tune --storage`; the password is in pgpass."""
    return f"postgresql+psycopg2://{DB_ROLE}@127.0.0.1:{pg_port}/{OPTUNA_DB}"


def start(root: Path, host: str, port: int, pg_port: int, allowed_hosts: str | None = None,
          artifacts: str | None = None) -> str:
    """Start PostgreSQL and `mlflow server --app-name basic-auth` in `root`, those that are not running;
    the artifacts in `artifacts` (an object store's URI) instead of `root`/artifacts when given."""
    folder = Folder(root)
    if folder.root.exists() and not folder.root.is_dir():
        raise UserError(f"TEAM_DIR {folder.root} is not a folder")
    pid = _mlflow_pid(folder)
    if pid is not None and _postgres_port(folder) is not None:
        url = folder.url.read_text().strip()
        return f"team server already running: {url} (pid {pid}, folder {folder.root})"
    if pid is not None:
        raise UserError(f"mlflow server (pid {pid}) runs without its PostgreSQL: "
                        "stop it (make team-server-stop), then start again")
    _check_port_free(host, port, "TEAM_PORT")  # before anything starts or is created
    bin_dir = postgres_bin(folder)
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.artifacts.mkdir(exist_ok=True)
    if not (folder.cluster / "PG_VERSION").exists():
        _init_cluster(folder, bin_dir)
    running_port = _postgres_port(folder)
    if running_port is None:
        _start_postgres(folder, bin_dir, pg_port)
    else:
        pg_port = running_port
    admin_exists = _create_databases(folder, pg_port)

    # MLflow reads the admin's password only to create that user: from the variable, else our file
    given = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    admin_password = None if admin_exists else given or _secret(folder.admin_password)
    options = ["--artifacts-destination", artifacts or str(folder.artifacts)]
    if allowed_hosts:
        options += ["--allowed-hosts", allowed_hosts]
    url = _start_mlflow(folder, host, port, pg_port, options, admin_password)
    lines = [f"team server: {url} (PostgreSQL on 127.0.0.1:{pg_port}, folder {folder.root})",
             f"tune's storage: {optuna_storage(pg_port)} (with PGPASSFILE={folder.pgpass})"]
    if admin_password is not None:
        _create_experiment(url, admin_password)
        where = "MLFLOW_AUTH_ADMIN_PASSWORD" if given else folder.admin_password
        lines.append(f"user {ADMIN} created, password in {where}; experiment {EXPERIMENT} created "
                     "(users get READ; grant EDIT per user: docs/team.md)")
    return "\n".join(lines)


def stop(root: Path) -> str:
    """Stop the folder's `mlflow server` (its process group), then its PostgreSQL."""
    folder = Folder(root)
    stopped = []
    pid = _mlflow_pid(folder)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _mlflow_pid(folder) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if _mlflow_pid(folder) is not None:
            os.killpg(pid, signal.SIGKILL)
        stopped.append(f"mlflow server (pid {pid})")
    if _postgres_port(folder) is not None:
        _run(_as_postgres([str(postgres_bin(folder) / "pg_ctl"), "stop", "-w", "-t", "60", "-m", "fast",
                           "-D", str(folder.cluster)]), "stopping PostgreSQL")
        stopped.append("PostgreSQL")
    folder.mlflow_pid.unlink(missing_ok=True)
    if not stopped:
        return f"team server in {folder.root} is not running"
    return f"stopped {' and '.join(stopped)} ({folder.root})"

