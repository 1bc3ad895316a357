"""The parts of a shared study's start-up, in-process on an SQLite storage: the artifact store kept
in the study's own storage, and the start-up lock (one holder; a dead holder's lock is removed
once its beats stop, a live one's never)."""

from __future__ import annotations

import io
import time

import optuna
import pytest
from optuna.artifacts import download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from apostate.workers import study_artifacts
from apostate.workers.startup_lock import StartupLock
from apostate.workers.study_artifacts import StudyArtifactStore

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")


def test_an_artifact_travels_through_the_studys_storage_in_chunks(storage, tmp_path, monkeypatch):
    monkeypatch.setattr(study_artifacts, "CHUNK_BYTES", 1000)
    study = optuna.create_study(study_name="s", storage=storage)
    data = bytes(range(256)) * 20  # 5,120 bytes: 6 chunks
    source = tmp_path / "startup.pt"
    source.write_bytes(data)
    artifact_id = upload_artifact(
        artifact_store=StudyArtifactStore(storage, "s"), file_path=str(source), study_or_trial=study
    )

    # Another process, knowing only the storage and the study's name:
    store = StudyArtifactStore(optuna.storages.RDBStorage(storage.url), "s")
    download_artifact(artifact_store=store, file_path=str(tmp_path / "fetched"), artifact_id=artifact_id)
    assert (tmp_path / "fetched").read_bytes() == data
    holder = storage.get_study_id_from_name("s:artifacts")
    assert sum(key.startswith(artifact_id) for key in storage.get_study_system_attrs(holder)) == 6 + 1
    assert [meta.artifact_id for meta in optuna.artifacts.get_all_artifact_meta(study)] == [artifact_id]

    with pytest.raises(ArtifactNotFound):
        store.open_reader("no-such-artifact")
    store.remove(artifact_id)
    with pytest.raises(ArtifactNotFound):
        store.open_reader(artifact_id)


def test_an_empty_artifact_reads_back_empty(storage):
    store = StudyArtifactStore(storage, "s")
    store.write("empty", io.BytesIO(b""))
    assert store.open_reader("empty").read() == b""


def test_one_holder_at_a_time_and_a_dead_holders_lock_is_taken_over(storage):
    first = StartupLock(storage, "s", "first", beat_seconds=0.1, grace_seconds=0.5)
    second = StartupLock(storage, "s", "second", beat_seconds=0.1, grace_seconds=0.5)
    assert first.acquire()
    assert not second.acquire()
    time.sleep(1.0)  # first beats: its lock stays however long it holds it
    assert second.holder() == "first" and not second.acquire()
    first.release()
    assert second.holder() is None and second.acquire()

    # `second` dies holding it: its beats stop, its lock stays in the storage.
    second._stop.set()
    second._beats.join()
    third = StartupLock(storage, "s", "third", beat_seconds=0.1, grace_seconds=0.5)
    assert third.holder() == "second"
    deadline = time.monotonic() + 5
    while third.holder() is not None:
        assert time.monotonic() < deadline, "a dead holder's lock was never taken over"
        time.sleep(0.1)
    assert third.acquire()
    third.release()


@pytest.mark.parametrize(
    ("url", "what", "said"),
    [
        ("not a url", "--storage: not a URL", "--storage is not a database URL"),
        ("nosuchdb://user@host/db", "--storage: an unknown kind of database", "SQLAlchemy knows no such database kind"),
        ("mysql://user@127.0.0.1/db", "--storage: its driver not installed", "the database driver MySQLdb"),
    ],
    ids=["not-a-url", "unknown-kind", "no-driver"],
)
def test_a_storage_url_that_cannot_work_is_one_line(url, what, said, bad_input):
    from apostate.errors import ApostateError
    from apostate.workers.storage import open_database

    with pytest.raises(ApostateError) as excinfo:
        open_database(url, 30)
    assert said in bad_input.raised("workers", what, excinfo)
