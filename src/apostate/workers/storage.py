"""Where a run's study lives: the journal file in the run folder (one process), or any storage
URL Optuna takes (`--storage`; PostgreSQL is the tested one), where several workers share it.

A storage URL may hold a password: it is shown and recorded only with the password masked
(`masked_url`). The run folder records the masked URL and the study name in `storage.json`, so
that `apostate report RUN_DIR` finds the study again (the password then comes from
PGPASSWORD or ~/.pgpass, as for any libpq client, or from `--storage`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import make_url

from apostate.errors import ApostateError, first_line
from apostate.search.study import JOURNAL, STUDY_NAME

RECORD = "storage.json"
GRACE_BEATS = 4  # a trial whose worker missed this many heartbeats is failed and run again
TABLE_RACE_ATTEMPTS = 3
MAX_RETRIES = 3  # how often one trial is run again after its worker died
DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}  # psycopg 3: the `postgres` extra

# What a storage raises when the database cannot be reached or answers with an error.
STORAGE_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    optuna.exceptions.StorageInternalError,
)


def database_url(url: str) -> str:
    """The SQLAlchemy URL to connect with: a plain `postgresql://` gets the psycopg 3 driver
    (SQLAlchemy's own default, psycopg2, is not what the `postgres` extra installs)."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ApostateError(
            "--storage is not a database URL; give one like postgresql://user@host:5432/database"
        ) from None
    driver = DRIVERS.get(parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False) if driver else url


def masked_url(url: str) -> str:
    """The URL with its password masked: what may be printed or written."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "(not a URL)"


class WorkerStorage(RDBStorage):
    """RDBStorage whose heartbeat thread outlives a lost connection (it beats again when the
    database is back): the worker's own next write reports the loss, in one line, rather than
    the thread dying with a traceback."""

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(*STORAGE_ERRORS):
            super().record_heartbeat(trial_id)


def open_database(url: str, heartbeat_seconds: int) -> WorkerStorage:
    """The database storage, with heartbeats: a trial whose worker stops beating is failed and
    put back in the queue (RetryHeartbeatStaleTrialCallback), for another worker to run."""
    try:
        return _with_tables(database_url(url), heartbeat_seconds)
    except ImportError as error:  # Optuna's, around the driver's ModuleNotFoundError
        raise ApostateError(_no_driver(error)) from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise ApostateError(f"--storage {masked_url(url)}: SQLAlchemy knows no such database kind") from None
    except STORAGE_ERRORS as error:
        raise ApostateError(unreachable_message(url, error)) from None


def _with_tables(connect: str, heartbeat_seconds: int) -> WorkerStorage:
    """Workers starting together on an empty database race to create Optuna's tables; the ones
    that lose (a duplicate key) open it again once the winner's tables are there."""
    for attempt in range(TABLE_RACE_ATTEMPTS - 1):
        try:
            return _worker_storage(connect, heartbeat_seconds)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(1 + attempt)
    return _worker_storage(connect, heartbeat_seconds)


def _worker_storage(connect: str, heartbeat_seconds: int) -> WorkerStorage:
    with warnings.catch_warnings():  # heartbeats and their retry callback are "experimental" since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return WorkerStorage(
            connect,
            engine_kwargs={"pool_pre_ping": True},
            heartbeat_interval=heartbeat_seconds,
            grace_period=GRACE_BEATS * heartbeat_seconds,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )


def _no_driver(error: ImportError) -> str:
    missing = getattr(error.__cause__, "name", None) or error.name or "module"
    return (
        f"the database driver {missing} for --storage is not installed; install it "
        "(for PostgreSQL: pip install 'apostate[postgres]')"
    )


def _reason(error: BaseException) -> str:
    """The database's own words: the driver's error under SQLAlchemy's and Optuna's wrappers."""
    while True:
        inner = getattr(error, "orig", None) or error.__cause__
        if inner is None or inner is error:
            return first_line(error)
        error = inner


def unreachable_message(url: str, error: Exception) -> str:
    reason = _reason(error)
    return f"cannot reach the study's storage {masked_url(url)} ({reason}); check that the database runs and the URL"


def lost_message(url: str, error: Exception) -> str:
    return (
        f"lost the connection to the study's storage {masked_url(url)} ({_reason(error)}); the finished trials are "
        "kept there: run the same command again when the database is back"
    )


def write_record(run_dir: Path, url: str, study_name: str) -> None:
    """Name the study's storage in the run folder, without its password."""
    path = run_dir / RECORD
    scratch = path.with_name(f".{path.name}.{os.getpid()}.partial")
    without_password = make_url(database_url(url))._replace(password=None).render_as_string(hide_password=False)
    scratch.write_text(json.dumps({"storage": without_password, "study_name": study_name}, indent=2))
    scratch.replace(path)


def read_record(run_dir: Path) -> dict | None:
    path = run_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def study_location(run_dir: Path, url: str | None = None, study_name: str | None = None) -> tuple[str | None, str]:
    """Where a run folder's study is, to read it: (`url` if given, else the database its
    storage.json names, else None: its journal) and the study's name."""
    record = read_record(run_dir)
    if url is None and record is not None:
        url = record["storage"]
    if url is not None:
        return url, study_name or (record["study_name"] if record else STUDY_NAME)
    if not (run_dir / JOURNAL).is_file():
        raise ApostateError(
            f"{run_dir} is not an apostate run folder (it has no {JOURNAL} or {RECORD}); give the run's folder"
        )
    return None, STUDY_NAME


def open_for_reading(url: str) -> RDBStorage:
    """A database storage to read a study from (no heartbeats: this process runs no trial)."""
    try:
        return RDBStorage(database_url(url), skip_table_creation=True)
    except ImportError as error:  # Optuna's, around the driver's ModuleNotFoundError
        raise ApostateError(_no_driver(error)) from None
    except STORAGE_ERRORS as error:
        raise ApostateError(unreachable_message(url, error)) from None
