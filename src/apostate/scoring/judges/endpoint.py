"""A judge behind an OpenAI-compatible chat endpoint (llama.cpp server, vLLM, Ollama, or a
hosted API), through the `openai` client: the rubric per pair, a reply of a few tokens at
temperature 0, read for its first label word. Pairs go out `concurrency` at a time.

The API key comes from the settings or the environment and is handed to the client only:
it is never printed, logged or written anywhere.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from apostate.errors import ApostateError, first_line
from apostate.scoring.judges.rubric import judge_messages, parse_label
from apostate.scoring.verdicts import Verdict

REPLY_TOKENS = 4


class EndpointJudge:
    def __init__(self, url: str, model: str, api_key: str | None, concurrency: int = 4, timeout: float = 60.0):
        try:
            import openai
        except ImportError:
            raise ApostateError(
                "an endpoint judge needs the openai client; install it with pip install 'apostate[judge]'"
            ) from None
        self.openai = openai
        # The client wants some key; local servers accept any, so a missing one is sent as "none".
        self.client = openai.OpenAI(base_url=url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.url = url
        self.model = model
        self.concurrency = concurrency
        self.name = f"endpoint:{url}#{model}"
        self.unreadable = 0  # replies that named no label (their pairs fall back to the marker verdict)

    def check(self) -> None:
        """One request at start-up: the endpoint answers, takes the key, and replies with a label."""
        reply = self._reply("How do I bake bread?", "Mix flour, water, salt and yeast, let it rise, then bake.")
        if parse_label(reply) is None:
            raise ApostateError(
                f"judge endpoint {self.url} (model '{self.model}') replied {reply[:60]!r}, which names no label "
                "(refusal, evasive, compliance or broken); pick a model that follows instructions"
            )

    def verdicts(
        self, prompts: list[str], responses: list[str], choices: tuple[Verdict, ...] = ()
    ) -> list[Verdict | None]:
        """One verdict per pair; None where the reply named no label. (`choices` are not enforced:
        the rubric asks for all four labels, and a reply is taken as it comes.)"""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            replies = list(pool.map(self._reply, prompts, responses))
        labels = [parse_label(reply) for reply in replies]
        self.unreadable += sum(label is None for label in labels)
        return labels

    def _reply(self, prompt: str, response: str) -> str:
        openai = self.openai
        try:
            completion = self.client.chat.completions.create(
                model=self.model,
                messages=judge_messages(prompt, response),
                max_tokens=REPLY_TOKENS,
                temperature=0.0,
            )
        except openai.AuthenticationError:
            raise ApostateError(
                f"judge endpoint {self.url} refused the API key (HTTP 401); set the right one in "
                "APOSTATE_JUDGE__API_KEY or OPENAI_API_KEY"
            ) from None
        except openai.APIConnectionError as error:
            raise ApostateError(
                f"judge endpoint {self.url} cannot be reached ({first_line(error)}); start the server or fix --judge.url"
            ) from None
        except openai.APIStatusError as error:
            raise ApostateError(
                f"judge endpoint {self.url} answered HTTP {error.status_code} for model '{self.model}' "
                f"({_short(error)}); check --judge.url and --judge.model"
            ) from None
        choice = completion.choices[0] if completion.choices else None
        return (choice.message.content or "") if choice is not None else ""


def _short(error) -> str:
    """The server's error message without echoing anything the request held."""
    body = error.body if isinstance(error.body, dict) else {}
    message = body.get("message")
    return first_line(Exception(str(message))) if message else type(error).__name__
