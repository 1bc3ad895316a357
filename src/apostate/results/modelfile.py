"""An Ollama Modelfile for an exported GGUF: FROM the file, its chat template as Ollama's Go
template, its stop strings, and the system prompt the trial was scored with.

Ollama cannot run a Jinja chat template, so the template is read off the model's own rendering:
a conversation of marker strings is rendered with the tokenizer's template, and the text between
the markers gives each role's prefix and end-of-turn, and the generation prompt:

    <sys prefix> S <eot> <user prefix> U1 <eot> <gen prompt> A1 <eot> <user prefix> U2 <eot> <gen prompt>

A template that does not render this shape (roles it checks, turns it alters) is refused with
one line: the GGUF still carries the template itself, which llama.cpp applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from apostate.errors import ApostateError

_S, _U1, _A1, _U2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01ASSISTANT1\x01", "\x01USER2\x01"


@dataclass(frozen=True)
class TurnTemplate:
    """The literal text around each role's content, as the chat template renders it."""

    system_prefix: str
    user_prefix: str
    end_of_turn: str
    generation_prompt: str
    default_system: str | None  # what the template says when no system message is given

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the Go template below renders it (for checking it against Jinja)."""
        prefix = {"system": self.system_prefix, "user": self.user_prefix, "assistant": self.generation_prompt}
        text = "".join(prefix[m["role"]] + m["content"] + self.end_of_turn for m in messages)
        return text + (self.generation_prompt if add_generation_prompt else "")

    def go_template(self) -> str:
        """Ollama's TEMPLATE: one line, no trim markers (they would eat the pieces' newlines)."""
        roles = (
            f'{{{{ if eq .Role "system" }}}}{self.system_prefix}'
            f'{{{{ else if eq .Role "user" }}}}{self.user_prefix}'
            f'{{{{ else if eq .Role "assistant" }}}}{self.generation_prompt}{{{{ end }}}}'
        )
        turn = f"{roles}{{{{ .Content }}}}{self.end_of_turn}"
        return f"{{{{ range .Messages }}}}{turn}{{{{ end }}}}{self.generation_prompt}"


def turn_template(tokenizer) -> TurnTemplate:
    """Read the prefixes, end-of-turn and generation prompt off the tokenizer's chat template."""

    def render(messages, generation=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    system, user1 = {"role": "system", "content": _S}, {"role": "user", "content": _U1}
    chat = [system, user1, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]
    try:
        text = render(chat, generation=True)
        no_system = render([user1], generation=True)
    except Exception as error:  # the template's own checks (role order, unknown roles)
        raise _cannot(f"it did not render a plain conversation ({type(error).__name__})") from None
    bos = getattr(tokenizer, "bos_token", None) or ""
    if bos and text.startswith(bos):  # llama.cpp adds the BOS token itself (add_bos_token)
        text, no_system = text[len(bos) :], no_system.removeprefix(bos)
    try:
        system_prefix, rest = text.split(_S)
        after_system, rest = rest.split(_U1)
        after_user, rest = rest.split(_A1)
        after_assistant, rest = rest.split(_U2)
    except ValueError:
        raise _cannot("it changes or repeats the messages' text") from None
    generation_prompt = _generation_prompt(render, [system, user1])
    end_of_turn = rest.removesuffix(generation_prompt)
    user_prefix = after_assistant.removeprefix(end_of_turn)
    template = TurnTemplate(system_prefix, user_prefix, end_of_turn, generation_prompt, None)
    if not end_of_turn or after_system != end_of_turn + user_prefix or after_user != end_of_turn + generation_prompt:
        raise _cannot("its turns do not share one end-of-turn string")
    default = _default_system(template, no_system)
    template = TurnTemplate(system_prefix, user_prefix, end_of_turn, generation_prompt, default)
    if template.render(chat) != text:
        raise _cannot("its rendering could not be rebuilt from its pieces")
    return template


def _generation_prompt(render, messages) -> str:
    with_prompt, without = render(messages, generation=True), render(messages)
    if not with_prompt.startswith(without):
        raise _cannot("its generation prompt is not appended at the end")
    return with_prompt[len(without) :]


def _default_system(template: TurnTemplate, no_system: str) -> str | None:
    """The system message a template adds by itself (Qwen's "You are Qwen..."), if any."""
    user_turn = template.user_prefix + _U1 + template.end_of_turn + template.generation_prompt
    if no_system == user_turn:
        return None
    head = no_system.removesuffix(user_turn)
    if head == no_system or not head.startswith(template.system_prefix) or not head.endswith(template.end_of_turn):
        raise _cannot("what it renders without a system message could not be read")
    return head[len(template.system_prefix) : len(head) - len(template.end_of_turn)]


def _cannot(why: str) -> ApostateError:
    return ApostateError(
        f"cannot write an Ollama template from this model's chat template: {why}; "
        "the GGUF file carries the template for llama.cpp, and Ollama users can write a TEMPLATE by hand"
    )


def write_modelfile(folder: Path, gguf_name: str, tokenizer, system_prompt: str | None) -> Path:
    """`folder/Modelfile`: FROM ./<gguf_name>, TEMPLATE, stop strings, and SYSTEM (the scored one)."""
    template = turn_template(tokenizer)
    stops = [template.end_of_turn.strip()]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    system = system_prompt if system_prompt is not None else template.default_system
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template.go_template()}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops if stop]
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
