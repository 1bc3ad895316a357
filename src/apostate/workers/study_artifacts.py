"""An Optuna artifact store inside the study's own storage: what workers share travels through
the database they already reach, with no shared folder or object store to set up.

An artifact is written as base64 chunks in the system attributes of a companion study,
`<study>:artifacts`, and its chunk count last, so a reader never sees half an artifact.
It implements Optuna's ArtifactStore protocol: `optuna.artifacts.upload_artifact` and
`download_artifact` use it, and the study lists the artifacts' metadata as usual.
"""

from __future__ import annotations

import base64
import io
from typing import BinaryIO

from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage
from optuna.study import StudyDirection

CHUNK_BYTES = 4 * 2**20  # per attribute: a few round trips for tens of MB, each value well under PostgreSQL's limits


class StudyArtifactStore:
    """Artifacts of study `study_name`, kept in `storage` beside it."""

    def __init__(self, storage: BaseStorage, study_name: str) -> None:
        self.storage = storage
        self.holder = f"{study_name}:artifacts"

    def _holder_id(self) -> int:
        try:
            return self.storage.create_new_study(directions=[StudyDirection.MINIMIZE], study_name=self.holder)
        except DuplicatedStudyError:
            return self.storage.get_study_id_from_name(self.holder)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        holder = self._holder_id()
        data = content_body.read()
        chunks = [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)] or [b""]
        for index, chunk in enumerate(chunks):
            self.storage.set_study_system_attr(holder, f"{artifact_id}/{index}", base64.b64encode(chunk).decode())
        self.storage.set_study_system_attr(holder, f"{artifact_id}/chunks", len(chunks))

    def open_reader(self, artifact_id: str) -> BinaryIO:
        try:
            attrs = self.storage.get_study_system_attrs(self.storage.get_study_id_from_name(self.holder))
        except KeyError:
            raise ArtifactNotFound(f"no artifacts stored for {self.holder}") from None
        count = attrs.get(f"{artifact_id}/chunks")
        if count is None:
            raise ArtifactNotFound(f"artifact {artifact_id} is not in {self.holder}")
        return io.BytesIO(b"".join(base64.b64decode(attrs[f"{artifact_id}/{index}"]) for index in range(count)))

    def remove(self, artifact_id: str) -> None:
        self.storage.set_study_system_attr(self._holder_id(), f"{artifact_id}/chunks", None)
