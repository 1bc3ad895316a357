"""Reading a finished or running run's study, wherever it lives, without settings: for reports,
--show-results and tests."""

from __future__ import annotations

from pathlib import Path

import optuna

from apostate.errors import ApostateError
from apostate.search.study import journal_storage
from apostate.workers.storage import STORAGE_ERRORS, open_for_reading, study_location, unreachable_message


def load_run_study(run_dir: Path, url: str | None = None, study_name: str | None = None) -> optuna.Study:
    """A run folder's study as stored (its journal, or the database its storage.json names):
    no settings check, no sampler."""
    url, name = study_location(run_dir, url, study_name)
    storage = journal_storage(run_dir) if url is None else open_for_reading(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ApostateError(f"the storage named by {run_dir} holds no study {name}") from None
    except STORAGE_ERRORS as error:  # only a database's
        raise ApostateError(unreachable_message(url, error)) from error
