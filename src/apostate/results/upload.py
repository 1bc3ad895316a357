"""Publish a finished export folder on the Hugging Face hub.

An export (the merged model or the adapter, with its model card README.md and apostate.json) is
already what a hub repository holds, so publishing it is two calls to huggingface_hub: create the
repository (private unless asked otherwise; one that exists is left as it is) and upload the
folder (`HfApi.create_repo`, `HfApi.upload_folder`). The local export is only read: whatever the
hub answers, it stays as it was saved.

The token is huggingface_hub's own (HF_TOKEN, or its login store written by `hf auth login`), or,
when there is a terminal to ask on, typed at a hidden prompt. It goes to huggingface_hub only:
apostate never prints it and never writes it to any file. A hub error (a wrong token, no write
access, a name the hub refuses, no network) is one line naming the problem and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from apostate import __version__
from apostate.errors import ApostateError, first_line
from apostate.results.upload_settings import UploadSettings

LOGIN_HINT = "set HF_TOKEN to a token with write access, or run `hf auth login`"
PROMPT_LOGIN_HINT = "type a token with write access, set HF_TOKEN, or run `hf auth login`"


def check_before_loading(settings: UploadSettings, method: str, edits_in_adapter: bool) -> None:
    """Refuse a headless upload that cannot work before any model is loaded: no repository name,
    a name the hub's rules forbid, an adapter upload of a `method` no adapter can hold, no token."""
    check_repo_name(settings.repo)
    if settings.export == "adapter" and not edits_in_adapter:
        raise ApostateError(
            f"upload.export is 'adapter', but method '{method}' edits full weights, which a LoRA "
            "adapter cannot hold; upload the merged model (upload.export = 'model') or use method 'ara-lora'"
        )
    if find_token() is None:
        raise ApostateError(f"no Hugging Face token to upload with: {LOGIN_HINT}, then run the same command again")


def check_repo_name(repo: str | None) -> str:
    if not repo:
        raise ApostateError(
            "the upload action needs a hub repository: give --upload.repo user/name (or repo in the config "
            "file's [upload] table)"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        raise ApostateError(
            f"--upload.repo '{repo}' is not a hub repository name ({first_line(error).rstrip('.')}); "
            "give 'user/name' (letters, digits, '-', '_', '.')"
        ) from None
    return repo


def destination(settings, ask: bool) -> tuple[str, bool] | None:
    """(repository, private) from the upload settings; with a terminal, the name is asked for where
    unset and the visibility confirmed. None: the user cancelled."""
    if not ask:
        return check_repo_name(settings.repo), settings.private
    import questionary

    repo = settings.repo or questionary.text("Hub repository to upload to (user/name):").ask()
    if not repo:
        return None
    check_repo_name(repo)
    private = questionary.confirm("Private repository?", default=settings.private).ask()
    return None if private is None else (repo, private)


def find_token() -> str | None:
    """huggingface_hub's token: HF_TOKEN, else its login store (None: neither)."""
    from huggingface_hub import get_token

    return get_token()


def upload_token(ask: bool) -> str:
    """The token to upload with: huggingface_hub's own, else (with a terminal) typed, hidden."""
    found = find_token()
    if found:
        return found
    if not ask:
        raise ApostateError(f"no Hugging Face token to upload with: {LOGIN_HINT}")
    import questionary

    typed = questionary.password("Hugging Face token with write access (used for this upload only):").ask()
    if not typed or not typed.strip():
        raise ApostateError(f"no Hugging Face token to upload with: {PROMPT_LOGIN_HINT}")
    return typed.strip()


def holds_export(folder: Path, expected: dict) -> bool:
    """Whether `folder`'s apostate.json has every key of `expected` with that value (compared as JSON;
    its scores may hold more rows: a GGUF export adds the file's own)."""
    try:
        record = json.loads((Path(folder) / "apostate.json").read_text())
    except (OSError, ValueError):
        return False
    expected = json.loads(json.dumps(expected, default=str))
    if not isinstance(record, dict):
        return False
    if "scores" in expected:
        scores = record.get("scores")
        if not isinstance(scores, dict) or any(scores.get(k) != v for k, v in expected.pop("scores").items()):
            return False
    return all(record.get(key) == value for key, value in expected.items())


def publish(folder: Path, repo: str, private: bool, token: str) -> str:
    """Create `repo` on the hub (exist_ok) and upload `folder` into it in one commit; its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="apostate", library_version=__version__)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message="Upload apostate export")
    except Exception as error:
        problem = hub_problem(error, repo, api.endpoint)
        if problem is None:
            raise
        raise ApostateError(
            f"upload to {repo} failed: {problem} (the export in {folder} is kept; run the same command again "
            "to upload it)"
        ) from error
    return str(url)


def hub_problem(error: Exception, repo: str, endpoint: str) -> str | None:
    """What went wrong and what to do, for an error of the hub or the network (None: neither)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set; unset it"
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code
        said = " ".join((error.server_message or first_line(error)).split())
        if status == 401:
            return f"the hub refused the token (401: wrong or expired); {LOGIN_HINT}"
        if status == 403:
            return f"the token may not write to {repo} (403: {said}); use a token with write access to its namespace"
        if status in (400, 409, 422):
            return f"the hub refused the repository {repo} ({status}: {said}); choose another --upload.repo"
        if status == 404:
            return f"the hub has no repository {repo} for this token (404); check the name and the token's namespace"
        return f"the hub answered {status} ({said}); try again later"
    if isinstance(error, ConnectionError | TimeoutError) or any(
        cls.__name__ == "TransportError" for cls in type(error).__mro__
    ):  # httpx's network errors
        return f"the hub at {endpoint} cannot be reached ({first_line(error)}); check the network"
    return None
