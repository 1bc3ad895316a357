"""--actions upload: the chosen trial's export (saved first where needed) published on a local stand-in
for the Hugging Face hub (tests/hub_stub.py), private or public; the token never printed or written;
a wrong token, no token, no repository name, a name the hub refuses and an unreachable hub each one
line, with finished trials and the export kept.

huggingface_hub is pointed at the stub in-process by `huggingface_hub.constants.ENDPOINT`, which
HfApi reads when it is built (HF_ENDPOINT is read only when huggingface_hub is first imported)."""

import contextlib
import io

import huggingface_hub
import pytest
from exports import hashes
from hub_stub import TOKEN, HubStub
from test_end_to_end import load_study, run
from test_judged_run import every_file_text

from apostate.commands import run as pipeline
from apostate.errors import ApostateError
from apostate.results import upload
from apostate.results.upload_settings import UploadSettings
from apostate.search.study import completed

WRONG_TOKEN = "hf_wrongTOKENabcdef0123456789NotThisOne"


def no_login_store(monkeypatch, home):
    """No token anywhere but where a test puts one: HF_HOME (and the paths read from it at import) is `home`."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


@pytest.fixture(scope="module")
def hub():
    with HubStub() as stub, pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", stub.url)
        yield stub


@pytest.fixture(scope="module")
def uploaded(model_dir, hub, tmp_path_factory):
    """One headless run whose actions are given as `upload save`: the save must still come first."""
    root = tmp_path_factory.mktemp("upload")
    run_dir = root / "run"
    flags = ["--n-trials", "2", "--headless", "--actions", "upload", "--actions", "save",
             "--upload.repo", "user/tiny", "--cache-dir", str(root / "cache")]  # fmt: skip
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stderr(io.StringIO()) as err:
        no_login_store(monkeypatch, root / "hf-home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        code = run(model_dir, run_dir, *flags)
    return code, root, run_dir, err.getvalue()


def test_a_headless_run_saves_then_uploads_the_export_privately(uploaded, hub):
    code, _, run_dir, out = uploaded
    assert code == 0, out
    repo = hub.repos["user/tiny"]
    assert repo.private, "private by default"
    export = run_dir / "model"
    local = {str(path.relative_to(export)): path.read_bytes() for path in export.rglob("*") if path.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "apostate.json"} <= set(repo.files)
    assert repo.files == local, "every file of the export, byte for byte"
    assert out.count("Saved to") == 1 and out.index("Saved to") < out.index("Uploaded")
    assert f"{hub.url}/user/tiny" in out
    routes = {request.split()[1].split("?")[0].replace("user/tiny", "REPO") for request in hub.requests}
    assert routes - {"/api/agent-harnesses"} == {"/api/repos/create", "/api/validate-yaml", "/api/models/REPO/preupload/main",
                      "/api/models/REPO/commit/main"}, "no other hub call"  # fmt: skip


def test_an_export_already_saved_is_uploaded_as_it_is_and_can_be_public(uploaded, hub, model_dir, monkeypatch, capsys):
    _, root, run_dir, _ = uploaded
    before = hashes(run_dir / "model")
    no_login_store(monkeypatch, root / "hf-home")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    flags = ["--n-trials", "2", "--headless", "--actions", "upload", "--upload.repo", "user/public",
             "--no-upload.private"]  # fmt: skip
    assert run(model_dir, run_dir, *flags) == 0
    out = capsys.readouterr().err
    assert "Saved to" not in out, "the folder held this trial's export: not saved again"
    assert hashes(run_dir / "model") == before
    assert not hub.repos["user/public"].private
    assert hub.repos["user/public"].files == hub.repos["user/tiny"].files


def test_the_token_is_never_printed_or_written(uploaded):
    code, root, _, out = uploaded
    assert code == 0 and "Uploaded" in out  # the token was used
    assert TOKEN not in out
    written = every_file_text(root)  # run folder, export, cache dir, HF_HOME
    assert any(path.suffix == ".safetensors" for path in written)
    assert [path for path, data in written.items() if TOKEN.encode() in data] == []


def kept(run_dir):
    return hashes(run_dir / "model"), {t.number: t.values for t in completed(load_study(run_dir))}


def test_a_wrong_token_is_one_line_and_keeps_trials_and_export(uploaded, hub, model_dir, monkeypatch, bad_input):
    _, root, run_dir, _ = uploaded
    before = kept(run_dir)
    no_login_store(monkeypatch, root / "hf-home")
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    flags = ["--n-trials", "2", "--headless", "--actions", "upload", "--upload.repo", "user/wrong-token"]
    code = run(model_dir, run_dir, *flags)
    line = bad_input.error("upload", "wrong hub token (HF_TOKEN) for --actions upload", code)
    assert "401" in line and "HF_TOKEN" in line and WRONG_TOKEN not in line
    assert "user/wrong-token" not in hub.repos
    assert kept(run_dir) == before


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the upload settings were checked")

    monkeypatch.setattr(pipeline, "start_session", refuse)


def test_no_token_headless_is_one_line_before_the_model_loads(
    uploaded, model_dir, monkeypatch, tmp_path, bad_input, no_model_load
):
    _, _, run_dir, _ = uploaded
    before = kept(run_dir)
    no_login_store(monkeypatch, tmp_path / "empty-hf-home")
    flags = ["--n-trials", "2", "--headless", "--actions", "upload", "--upload.repo", "user/tiny"]
    code = run(model_dir, run_dir, *flags)
    line = bad_input.error("upload", "--actions upload headless with no hub token", code)
    assert "HF_TOKEN" in line and "hf auth login" in line
    assert kept(run_dir) == before


@pytest.mark.parametrize(
    ("flags", "what"),
    [([], "--actions upload without --upload.repo"), (["--upload.repo", "user/a--b"], "an invalid --upload.repo")],
)
def test_a_missing_or_invalid_repo_is_one_line_before_the_model_loads(
    model_dir, tmp_path, monkeypatch, bad_input, no_model_load, flags, what
):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = run(model_dir, tmp_path / "run", "--n-trials", "2", "--headless", "--actions", "upload", *flags)
    line = bad_input.error("upload", what, code)
    assert "--upload.repo" in line


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "apostate.json").write_text('{"trial": 3, "method": "directional"}')
    return tmp_path / "export"


def test_a_name_the_hub_refuses_is_one_line(hub, folder, bad_input):
    hub.rejected_names.add("refused")
    with pytest.raises(ApostateError) as error:
        upload.publish(folder, "user/refused", True, TOKEN)
    message = bad_input.raised("upload", "a repository name the hub refuses (400)", error)
    assert "choose another --upload.repo" in message and "user/refused" not in hub.repos


def test_an_unreachable_hub_is_one_line(folder, monkeypatch, bad_input):
    with HubStub() as gone:
        url = gone.url
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    with pytest.raises(ApostateError) as error:
        upload.publish(folder, "user/tiny", True, TOKEN)
    message = bad_input.raised("upload", "the hub cannot be reached during an upload", error)
    assert "cannot be reached" in message and str(folder) in message


def test_an_export_folder_is_recognized_by_its_trial(folder):
    assert upload.holds_export(folder, {"trial": 3, "method": "directional"})
    assert not upload.holds_export(folder, {"trial": 4, "method": "directional"})
    assert not upload.holds_export(folder, {"trial": 3, "method": "ara"})
    assert not upload.holds_export(folder.parent / "nothing", {"trial": 3})


class Answer:
    def __init__(self, value):
        self.value = value

    def ask(self):
        return self.value


def test_interactive_asks_for_repo_visibility_and_a_hidden_token(hub, folder, monkeypatch, tmp_path):
    import questionary

    no_login_store(monkeypatch, tmp_path / "empty-hf-home")
    asked = []
    for kind, value in (("text", "user/asked"), ("confirm", False), ("password", TOKEN)):

        def answer(*args, _kind=kind, _value=value, **kwargs):
            asked.append(_kind)
            return Answer(_value)

        monkeypatch.setattr(questionary, kind, answer)
    repo, private = upload.destination(UploadSettings(), ask=True)
    url = upload.publish(folder, repo, private, upload.upload_token(ask=True))
    assert asked == ["text", "confirm", "password"]
    assert url == f"{hub.url}/user/asked" and not hub.repos["user/asked"].private
    assert hub.repos["user/asked"].files["apostate.json"] == (folder / "apostate.json").read_bytes()
