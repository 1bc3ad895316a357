"""A chat template given by the user: the rule that tells its text from a file's path, and the
templates a run cannot measure anything with. Each case is a row of docs/bad-input.md."""

from __future__ import annotations

import pytest
from tiny import CHAT_TEMPLATE, SMALL

from apostate.cli import main
from apostate.model.chat_template import is_template_text, read_chat_template

RUN = [*SMALL, "--n-trials", "2", "--headless"]


def run(model_dir, tmp_path, *flags) -> int:
    return main([str(model_dir), "--run-dir", str(tmp_path / "run"), *RUN, *flags])


def test_the_rule_text_holds_jinja_syntax_anything_else_is_a_path(tmp_path):
    assert is_template_text(CHAT_TEMPLATE) and is_template_text("{# a comment #}")
    assert not is_template_text("./missing.jinja") and not is_template_text("templates/chat")
    saved = tmp_path / "chat.jinja"
    saved.write_text(CHAT_TEMPLATE)
    assert read_chat_template(str(saved)) == CHAT_TEMPLATE == read_chat_template(CHAT_TEMPLATE)


def test_a_template_path_that_does_not_exist(tmp_path, bad_input, model_dir):
    code = run(model_dir, tmp_path, "--chat-template", str(tmp_path / "missing.jinja"))
    line = bad_input.error("chat template", "--chat-template naming a file that does not exist", code)
    assert "missing.jinja does not exist" in line and "read as a file's path" in line
    assert not (tmp_path / "run").exists()  # refused with the settings, before anything started


def test_a_template_path_that_is_a_folder(tmp_path, bad_input, model_dir):
    (tmp_path / "templates").mkdir()
    code = run(model_dir, tmp_path, "--chat-template", str(tmp_path / "templates"))
    assert "is a folder" in bad_input.error("chat template", "--chat-template naming a folder", code)


def test_a_template_file_without_jinja(tmp_path, bad_input, model_dir):
    readme = tmp_path / "README.md"
    readme.write_text("# My model\nIt chats.\n")
    code = run(model_dir, tmp_path, "--chat-template", str(readme))
    line = bad_input.error("chat template", "--chat-template naming a file that holds no template", code)
    assert "holds no Jinja template" in line


def test_a_template_that_does_not_parse(tmp_path, bad_input, model_dir):
    code = run(model_dir, tmp_path, "--chat-template", "{% for message in messages %}{{ message['content'] }}")
    line = bad_input.error("chat template", "a template with a Jinja syntax error", code)
    assert "is not a valid Jinja template" in line and "(line 1)" in line


def test_a_template_that_leaves_out_the_users_message(tmp_path, bad_input, model_dir):
    template = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    code = run(model_dir, tmp_path, "--chat-template", template)
    line = bad_input.error("chat template", "a template that leaves out the user's message", code)
    assert "leaves out the user's message" in line


def test_a_template_that_opens_no_assistant_turn(tmp_path, bad_input, model_dir):
    template = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{% endfor %}"
    code = run(model_dir, tmp_path, "--chat-template", template)
    line = bad_input.error("chat template", "a template that puts nothing after the user's message", code)
    assert "continue the prompt instead of answering it" in line


def test_a_template_that_drops_the_system_prompt(tmp_path, bad_input, model_dir, capsys):
    template = (
        "{% for message in messages %}{% if message['role'] != 'system' %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n"
    )
    code = run(model_dir, tmp_path, "--chat-template", template, "--system-prompt", "Be brief.")
    output = capsys.readouterr().err
    line = bad_input.warned(
        "chat template", "a template that drops the system prompt", code, output, "drops the system prompt"
    )
    assert "drops the system prompt" in line


def test_the_rendered_chat_is_shown_once(tmp_path, model_dir, capsys):
    assert run(model_dir, tmp_path, "--system-prompt", "Be brief.") == 0
    shown = [line for line in capsys.readouterr().err.splitlines() if "The chat as the model sees it" in line]
    assert len(shown) == 1 and "<|im_start|>system\\nBe brief.<|im_end|>" in shown[0]
    assert shown[0].endswith("<|im_start|>assistant\\n'")


@pytest.mark.parametrize("where", ["file", "text"])
def test_a_good_template_given_as_file_or_text_runs(tmp_path, model_dir, where):
    saved = tmp_path / "chat.jinja"
    saved.write_text(CHAT_TEMPLATE)
    assert run(model_dir, tmp_path, "--chat-template", str(saved) if where == "file" else CHAT_TEMPLATE) == 0
