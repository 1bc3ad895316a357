"""A chat template given by the user (`chat_template`), as its text or as a file, and what a
template must do for a run to measure anything: show the user's message, then open the
assistant's turn.

The rule that tells text from a path, so a user can predict it: a value holding Jinja syntax
(`{{`, `{%` or `{#`) is the template's text; any other value is a path to a file that holds
it. A chat template without Jinja syntax cannot place a message anywhere, so no template is
misread as a path, and a mistyped file name is an error naming it, never a template that
turns every prompt into the path's letters.
"""

from __future__ import annotations

from pathlib import Path

from apostate.errors import ApostateError

JINJA_SYNTAX = ("{{", "{%", "{#")
PROBE = "Name three colours of the rainbow."  # a user message the checks render
PROBE_SYSTEM = "You answer in one short sentence."


def is_template_text(value: str) -> bool:
    """Whether `value` is a template's text (it holds Jinja syntax) rather than a file's path."""
    return any(mark in value for mark in JINJA_SYNTAX)


def read_chat_template(value: str) -> str:
    """The template's text: `value` itself, or the file it names (checked: exists, a file,
    UTF-8, holds Jinja syntax, and compiles)."""
    text = value if is_template_text(value) else _read_template_file(Path(value).expanduser())
    _compile(text, "--chat-template" if text is value else f"chat template file {value}")
    return text


def _read_template_file(path: Path) -> str:
    rule = "a --chat-template without Jinja syntax ({{ }}, {% %}) is read as a file's path"
    if not path.exists():
        raise ApostateError(
            f"chat template file {path} does not exist ({rule}); check the path, or give the template's text"
        )
    if path.is_dir():
        raise ApostateError(f"chat template file {path} is a folder; give the .jinja file inside it")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApostateError(f"chat template file {path} is not UTF-8 text; give a Jinja template file") from None
    except OSError as error:
        raise ApostateError(f"cannot read chat template file {path}: {error.strerror or error}") from None
    if not is_template_text(text):
        raise ApostateError(
            f"chat template file {path} holds no Jinja template (no {{{{ }}}} or {{% %}} in it); give the model's "
            "chat template, e.g. the chat_template of a tokenizer_config.json saved as a .jinja file"
        )
    return text


def _compile(text: str, where: str) -> None:
    """A template that does not parse is one line naming where, not an error from inside the first render."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as error:
        raise ApostateError(
            f"{where} is not a valid Jinja template: {error.message or 'syntax error'} (line {error.lineno})"
        ) from None


def check_rendering(tokenizer, system_prompt: str | None) -> list[str]:
    """Render a probe chat with the tokenizer's template: an error where the model could not be
    answering the prompts (the template drops the user's message, or puts nothing after it, so
    the model would go on writing the user's text); warnings (returned) where the run still
    measures something, but not what was asked (a system prompt the template drops)."""
    try:
        rendered = render(tokenizer, PROBE, None)
    except Exception as error:  # jinja2's own errors, or the template's raise_exception
        raise ApostateError(
            f"the chat template cannot render a plain user message ({type(error).__name__}: {error}); "
            "fix the template (--chat-template)"
        ) from error
    if PROBE not in rendered:
        raise ApostateError(
            "the chat template leaves out the user's message (a probe prompt does not appear in the rendered "
            "chat), so every prompt would look the same to the model; fix the template (--chat-template)"
        )
    if rendered.rstrip().endswith(PROBE):
        raise ApostateError(
            "the chat template puts nothing after the user's message (no assistant turn, even with "
            "add_generation_prompt), so the model would continue the prompt instead of answering it; "
            "fix the template (--chat-template)"
        )
    warnings = []
    if system_prompt is not None and system_prompt.strip():
        with_system = render(tokenizer, PROBE, PROBE_SYSTEM)
        if PROBE_SYSTEM not in with_system:
            warnings.append(
                "the chat template drops the system prompt (a probe system prompt does not appear in the rendered "
                "chat): the run measures the model without the system prompt you set"
            )
    return warnings


def render(tokenizer, prompt: str, system_prompt: str | None) -> str:
    """One user turn (after a system turn, where given), with the assistant's turn opened."""
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:
        if system_prompt is None:
            raise
        # Some templates (Gemma's, for one) reject a system role: fold it into the user turn.
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
        return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
