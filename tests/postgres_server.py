"""A throwaway PostgreSQL server for tests: the real server from the distribution's packages
(`apt-get install -y postgresql` on Debian/Ubuntu; .ci/run installs it), started in a temporary
folder, listening on 127.0.0.1 only (TCP on a free port, plus a Unix socket inside that private
folder), with one login role and one database whose password is required over TCP. Everything is
stopped and removed on exit.

    with PostgresServer() as server:
        storage = optuna.storages.RDBStorage(server.url)   # postgresql+psycopg://user:pw@127.0.0.1:PORT/db
        other = server.create_database()                    # a URL to a fresh, empty database

PostgreSQL refuses to run as root: as root the server runs as the `postgres` system user the
package creates (through subprocess's user=/group=, no sudo/runuser needed), in a folder it owns.
As any other user it runs as that user.

The server binaries are looked up in $PG_BINDIR, /usr/lib/postgresql/<version>/bin (Debian, the
newest version), then PATH and `pg_config --bindir`. When they are missing, PostgresServer raises
PostgresNotInstalled saying how to install them: tests that need the server fail, they never skip.

Fixtures (import them into tests/conftest.py): `postgres_server` (session-scoped, the server) and
`postgres_url` (session-scoped, its SQLAlchemy URL for the psycopg 3 driver).
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

INSTALL_HINT = (
    "install it with `apt-get install -y postgresql` (Debian/Ubuntu; .ci/run does this), "
    "or point $PG_BINDIR at the folder holding initdb, pg_ctl and postgres"
)
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql")
SUPERUSER = "postgres"  # the database superuser initdb creates (reachable only through the private socket)


class PostgresNotInstalled(RuntimeError):
    pass


def _has_programs(folder: str | os.PathLike) -> bool:
    return all(os.access(os.path.join(folder, name), os.X_OK) for name in SERVER_PROGRAMS)


def _version_key(folder: str) -> tuple:
    version = Path(folder).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) if part.isdigit() else -1 for part in re.split(r"[.\-]", version))


def find_bindir() -> Path:
    """The folder holding initdb, pg_ctl, postgres and psql; raises PostgresNotInstalled."""
    override = os.environ.get("PG_BINDIR")
    if override:
        if _has_programs(override):
            return Path(override)
        raise PostgresNotInstalled(f"$PG_BINDIR={override} lacks one of {', '.join(SERVER_PROGRAMS)}: {INSTALL_HINT}")
    debian = sorted((d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_programs(d)), key=_version_key)
    if debian:
        return Path(debian[-1])
    initdb = shutil.which("initdb")
    if initdb and _has_programs(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_programs(out):
            return Path(out)
    raise PostgresNotInstalled(
        f"PostgreSQL server programs ({', '.join(SERVER_PROGRAMS)}) not found in $PG_BINDIR, "
        f"/usr/lib/postgresql/*/bin, PATH or `pg_config --bindir`: {INSTALL_HINT}"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _world_traversable(path: Path) -> bool:
    """Whether another user (the postgres one) can reach path: every folder on the way has o+x."""
    path = path.resolve()
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in (path, *path.parents))


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 in a temporary folder; use it as a context manager."""

    def __init__(
        self,
        user: str = "apostate",
        database: str = "apostate",
        driver: str = "psycopg",
        max_connections: int = 100,
        base_dir: str | os.PathLike | None = None,
        start_timeout: float = 60,
    ):
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", user) or not re.fullmatch(r"[a-z_][a-z0-9_]*", database):
            raise ValueError("user and database: lower-case letters, digits and _ only")
        self.user = user
        self.database = database
        self.driver = driver
        self.password = secrets.token_hex(16)  # URL-safe, no quoting needed anywhere
        self.max_connections = max_connections
        self.base_dir = base_dir
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.folder: Path | None = None
        self.bindir: Path | None = None
        self.start_seconds: float | None = None  # initdb + start + role and database, as measured
        self._run_as: dict = {}
        self._databases = 0

    # -- URLs --------------------------------------------------------------------------------------
    def url_for(self, database: str, driver: str | None = None) -> str:
        driver = self.driver if driver is None else driver
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL: postgresql+psycopg://user:password@127.0.0.1:PORT/db."""
        return self.url_for(self.database)

    @property
    def dsn(self) -> str:
        """libpq URL (psycopg.connect, psql): postgresql://user:password@127.0.0.1:PORT/db."""
        return self.url_for(self.database, driver="")

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- life cycle --------------------------------------------------------------------------------
    def __enter__(self) -> PostgresServer:
        began = time.monotonic()
        self.bindir = find_bindir()
        self._prepare_folder()
        try:
            self._initdb()
            self._start()
            self._psql(
                f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
                f"CREATE DATABASE {self.database} OWNER {self.user}",
            )
        except BaseException:
            self._stop()
            raise
        atexit.register(self._stop)
        self.start_seconds = time.monotonic() - began
        return self

    def __exit__(self, *exc) -> None:
        atexit.unregister(self._stop)
        self._stop()

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database owned by the role; returns its URL (for tests that need isolation)."""
        self._databases += 1
        name = name or f"{self.database}_{self._databases}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError("database names: lower-case letters, digits and _ only")
        self._psql(f"CREATE DATABASE {name} OWNER {self.user}")
        return self.url_for(name)

    def cut_off(self, database: str) -> None:
        """Close every connection to `database` and refuse new ones: the database lost, as a client sees it."""
        self._psql(
            f"ALTER DATABASE {database} ALLOW_CONNECTIONS false",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'",
        )

    def reconnect(self, database: str) -> None:
        """Take connections to `database` again (after cut_off)."""
        self._psql(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")

    def _prepare_folder(self) -> None:
        base = Path(self.base_dir or tempfile.gettempdir())
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotInstalled(
                    "running as root: PostgreSQL refuses to run as root and there is no `postgres` system user "
                    f"to run it as; {INSTALL_HINT} (the package creates the user), or run the tests as another user"
                ) from None
            self._run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            if not _world_traversable(base):
                base = Path("/tmp")  # e.g. TMPDIR under /root: the postgres user could not reach the data folder
        self.folder = Path(tempfile.mkdtemp(prefix="apostate-pg-", dir=base))  # mode 0700
        if self._run_as:
            os.chown(self.folder, self._run_as["user"], self._run_as["group"])

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGHOST, PGPASSWORD...
        env.update(LC_ALL="C", LANG="C", TZ="UTC")  # no dependency on generated locales
        if self._run_as:
            env.update(HOME=str(self.folder), USER="postgres", LOGNAME="postgres")
        return env

    def _server_program(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """Runs initdb or pg_ctl as the server's user (postgres when we are root)."""
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True, text=True, timeout=timeout, cwd=self.folder, env=self._env(), **self._run_as,
        )  # fmt: skip

    def _initdb(self) -> None:
        done = self._server_program(
            "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-E", "UTF8", "--locale=C",
            "--auth-local=trust", "--auth-host=md5", "--no-sync", "--no-instructions",
            timeout=120,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        # The superuser only through the private socket; the role only over TCP on 127.0.0.1 with its password
        # (md5 here also accepts the SCRAM verifiers PostgreSQL stores by default). No other line: no ::1, no LAN.
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(f"local all {SUPERUSER} trust\nhost all {self.user} 127.0.0.1/32 md5\n")
        if self._run_as:
            os.chown(hba, self._run_as["user"], self._run_as["group"])

    def _start(self) -> None:
        attempts = 0
        while attempts < 5:  # the free port can be taken between the probe and the bind
            attempts += 1
            self.port = free_port()
            options = " ".join(
                f"-c {setting}"
                for setting in (
                    "listen_addresses=127.0.0.1",
                    f"port={self.port}",
                    f"unix_socket_directories={self.folder}",
                    f"max_connections={self.max_connections}",
                    "fsync=off", "synchronous_commit=off", "full_page_writes=off",  # throwaway data
                    "timezone=UTC",
                )
            )  # fmt: skip
            done = self._server_program(
                "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", str(int(self.start_timeout)),
                "-o", options, "start",
                timeout=self.start_timeout + 30,
            )  # fmt: skip
            if done.returncode == 0:
                return
            log = self.log_tail()
            if "could not bind" in log or "Address already in use" in log:
                continue
            break
        raise RuntimeError(
            f"PostgreSQL did not start (pg_ctl exit {done.returncode}, attempt {attempts}):\n"
            f"{done.stdout}{done.stderr}\n--- {self.log_file} ---\n{log}"
        )

    def _psql(self, *commands: str) -> None:
        args = [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.folder), "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"]  # fmt: skip
        for command in commands:
            args += ["-c", command]  # each -c its own transaction (CREATE DATABASE needs that)
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=self._env(), cwd=self.folder)
        if done.returncode:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")

    def _stop(self) -> None:
        """Stops the server if it runs and removes the folder; safe to call twice."""
        if self.folder is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            for mode in ("fast", "immediate"):  # fast: disconnects clients, immediate: no shutdown checkpoint
                try:
                    if self._server_program("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "20", "stop",
                                            timeout=40).returncode == 0:  # fmt: skip
                        break
                except subprocess.TimeoutExpired:
                    pass
            else:
                self._kill_postmaster()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 9)  # its children exit when the postmaster is gone
        except (OSError, ValueError, IndexError):
            pass


def require_driver(driver: str = "psycopg") -> None:
    """A clear error when the SQLAlchemy driver of the URLs is missing."""
    if importlib.util.find_spec(driver) is None:
        package = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary"}.get(driver, driver)
        raise ModuleNotFoundError(f"the PostgreSQL driver `{driver}` is not installed: pip install '{package}'")


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the whole session (fails, never skips, when PostgreSQL is not installed)."""
    require_driver()
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """postgresql+psycopg://apostate:<password>@127.0.0.1:<port>/apostate (shared: use distinct study names,
    or `postgres_server.create_database()` for a database of the test's own)."""
    return postgres_server.url


__all__ = [
    "PostgresNotInstalled", "PostgresServer", "find_bindir", "free_port", "postgres_server", "postgres_url",
    "require_driver",
]  # fmt: skip
