"""Start-up quantities of a study that several workers share (--storage): the first worker
measures them and publishes them in the study; the others wait, fetch them, and check that
they would have measured the same before they run a trial.

What is shared, as one Optuna artifact kept in the study's own storage (study_artifacts.py):
the batch size, the response prefix, the refusal directions, and the base model's first-token
log-probabilities, refusal count and responses. Its sha256, the worker identity it was
measured with (model, revision, prompt splits' sha256, trial-relevant settings) and the
dtype are the study's `startup` attribute; the first worker to have prepared what its method
prepares once (Method.prepare) puts its summary in the study's `prepared` attribute.

A joining worker is refused, in one line, when its identity or dtype differs; when its own
base model's first-token distributions differ from the study's (KL above BASE_KL_TOLERANCE:
another file under the same name); or when its own preparation differs (each worker prepares
its own: it is large, and the summary is enough to check it).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.artifacts import download_artifact, upload_artifact

from apostate.errors import ApostateError
from apostate.nested import changed_keys
from apostate.progress import console
from apostate.scoring.scorer import kl_divergence
from apostate.search.study import worker_name
from apostate.startup.measure import Startup, read_startup, write_startup
from apostate.workers.startup_lock import StartupLock
from apostate.workers.storage import GRACE_BEATS
from apostate.workers.study_artifacts import StudyArtifactStore

BASE_KL_TOLERANCE = 1e-3  # first-token KL between a worker's base model and the study's
PREPARED_TOLERANCE = 1e-2  # relative, on the numbers of the method's summary
POLL_SECONDS = 2.0


def worker_identity(settings, source, prompts) -> dict:
    """What a worker must share with the study's to join it (its dtype is checked once loaded)."""
    return {
        "model": source.name,
        "revision": source.revision,
        "prompts_sha256": prompts.sha256(),
        "settings": settings.measurement_fingerprint(source.name),
    }


class SharedStartup:
    """The start-up of a shared study: `join` either takes the lock (then `startup` stays None:
    measure, then `publish`) or waits for the study's and fetches it into `startup`."""

    def __init__(self, study: optuna.Study, identity: dict, beat_seconds: float):
        self.study = study
        self.identity = identity
        self.store = StudyArtifactStore(study._storage, study.study_name)
        self.worker = worker_name()
        grace = GRACE_BEATS * beat_seconds
        self.lock = StartupLock(study._storage, study.study_name, self.worker, beat_seconds, grace)
        self.dtype: str | None = None
        self.record: dict | None = None  # the study's, when this worker joined it
        self.startup: Startup | None = None  # the study's, fetched (None: this worker measures it)

    def join(self, dtype: str) -> None:
        self.dtype = dtype
        said = None
        while True:
            record = self.study.user_attrs.get("startup")
            if record is not None:
                return self._fetch(record)
            if self.lock.acquire():
                record = self.study.user_attrs.get("startup")  # published between the look and the claim?
                if record is None:
                    console.print("* This worker measures the study's start-up quantities; the others will wait")
                    return None
                self.lock.release()
                return self._fetch(record)
            holder = self.lock.holder()
            if holder is not None and holder != said:
                console.print(f"Waiting for worker {holder} to measure the study's start-up quantities...")
                said = holder
            time.sleep(POLL_SECONDS)

    def _fetch(self, record: dict) -> None:
        self.record = record
        self._check(record)
        with tempfile.TemporaryDirectory(prefix="apostate-startup-") as scratch:
            path = Path(scratch) / "startup.pt"
            download_artifact(artifact_store=self.store, file_path=str(path), artifact_id=record["artifact_id"])
            data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise ApostateError(
                f"the start-up quantities stored in study {self.study.study_name} are damaged (sha256 differs); "
                "start a new study with another --study-name"
            )
        self.startup = read_startup(io.BytesIO(data), self.identity)
        if self.startup is None:  # the identity matched: another version of apostate wrote them
            raise ApostateError(
                f"the start-up quantities of study {self.study.study_name} were written by another version of "
                "apostate; give every worker the same version"
            )
        console.print(f"* Start-up quantities from the study (measured by worker {record['worker']})")

    def _check(self, record: dict) -> None:
        differ = changed_keys(record["identity"], self.identity)
        if record["dtype"] != self.dtype:
            differ.append(f"dtype {self.dtype} (the study's: {record['dtype']})")
        if differ:
            raise ApostateError(
                f"this worker cannot join study {self.study.study_name}: its {', '.join(differ)} differ from the "
                "study's; give it the study's model and settings, or another --study-name"
            )

    def check_base(self, own_logprobs: Callable[[], torch.Tensor]) -> None:
        """A joining worker's own first-token distributions (one pass over the harmless evaluation
        prompts) against the study's."""
        if self.record is None:
            return
        kl = kl_divergence(self.startup.base_logprobs, own_logprobs())
        if not kl <= BASE_KL_TOLERANCE:
            raise ApostateError(
                f"this worker's model answers other first tokens than study {self.study.study_name}'s base model "
                f"(KL {kl:.3g} > {BASE_KL_TOLERANCE}): another model file or revision under the same name; "
                "give it the study's model"
            )
        console.print(f"* This worker's base model agrees with the study's (first-token KL {kl:.2g})")

    def check_prepared(self, summary: dict) -> None:
        """What the method prepared once for the run, as its summary (Method.prepared_summary):
        the first worker to have it puts it in the study, and every later one checks its own
        against it (each worker prepares its own: it is large)."""
        if not summary:
            return
        stored = self.study.user_attrs.get("prepared")
        if stored is None:
            self.study.set_user_attr("prepared", summary)
            return
        worst = _worst_relative_difference(stored, summary)
        if worst > PREPARED_TOLERANCE:
            raise ApostateError(
                f"what this worker prepared for its method differs from study {self.study.study_name}'s (by {worst:.3g} "
                f"relative): another model file or revision under the same name; give it the study's model"
            )
        console.print(f"* What this worker prepared for its method agrees with the study's (within {worst:.2g})")

    def publish(self, startup: Startup) -> None:
        """Put the measured start-up in the study, then let the waiting workers go (before this
        worker's own method preparation: theirs need not wait for it)."""
        if self.record is not None:
            return
        buffer = io.BytesIO()
        write_startup(startup, self.identity, buffer)  # read back only by workers of this identity
        data = buffer.getvalue()
        with tempfile.TemporaryDirectory(prefix="apostate-startup-") as scratch:
            path = Path(scratch) / "startup.pt"
            path.write_bytes(data)
            artifact_id = upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=self.study)
        self.study.set_user_attr("fingerprint", self.identity["settings"])  # this worker's settings are the study's
        self.study.set_user_attr(
            "startup",
            {
                "artifact_id": artifact_id,
                "sha256": hashlib.sha256(data).hexdigest(),
                "identity": self.identity,
                "dtype": self.dtype,
                "worker": self.worker,
                "batch_size": startup.batch_size,
                "response_prefix": startup.response_prefix,
                "seconds": startup.seconds,
            },
        )
        self.lock.release()

    def release(self) -> None:
        self.lock.release()


def _worst_relative_difference(stored: dict[str, list[float]], mine: dict[str, list[float]]) -> float:
    if stored.keys() != mine.keys():
        return float("inf")
    worst = 0.0
    for key, values in stored.items():
        for a, b in zip(values, mine[key], strict=True):
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    return worst
