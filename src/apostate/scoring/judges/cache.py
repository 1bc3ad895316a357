"""Verdicts kept on disk per run (SQLite), keyed by judge, rubric, prompt and response: a resumed
run or a second re-scoring asks the judge only about pairs it has not seen (under this rubric)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from apostate.scoring.judges.rubric import RUBRIC
from apostate.scoring.verdicts import Verdict

RUBRIC_DIGEST = hashlib.sha256(RUBRIC.encode()).hexdigest()[:12]  # a new rubric asks again


class VerdictCache:
    def __init__(self, path: Path):
        self.path = path
        self.connection = sqlite3.connect(path)
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (judge TEXT, pair TEXT, verdict TEXT, PRIMARY KEY (judge, pair))"
        )

    @staticmethod
    def pair_key(prompt: str, response: str) -> str:
        return hashlib.sha256(f"{len(prompt)}:{prompt}{response}".encode()).hexdigest()

    def get(self, judge: str, prompt: str, response: str) -> Verdict | None:
        row = self.connection.execute(
            "SELECT verdict FROM verdicts WHERE judge = ? AND pair = ?", (judge, self.pair_key(prompt, response))
        ).fetchone()
        return Verdict(row[0]) if row else None

    def put(self, judge: str, pairs: list[tuple[str, str]], verdicts: list[Verdict | None]) -> None:
        """Keep the verdicts; a None (the judge named no label) is not kept: it is asked again next time."""
        rows = [
            (judge, self.pair_key(*pair), verdict.value)
            for pair, verdict in zip(pairs, verdicts, strict=True)
            if verdict is not None
        ]
        with self.connection:  # one transaction: all or nothing
            self.connection.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        self.connection.close()


class CachedJudge:
    """A judge behind the cache: only the pairs the cache does not hold go to the judge."""

    def __init__(self, judge, cache: VerdictCache):
        self.judge = judge
        self.cache = cache
        self.name = judge.name
        self.asked = 0  # pairs the judge itself was asked about (the rest came from the cache)

    def check(self) -> None:
        self.judge.check()

    def verdicts(self, prompts: list[str], responses: list[str], choices: tuple[Verdict, ...]) -> list[Verdict | None]:
        choice_names = ",".join(choice.value for choice in choices)  # the choices change a verdict
        key = f"{self.name}|{choice_names}|{RUBRIC_DIGEST}"
        found = [self.cache.get(key, prompt, response) for prompt, response in zip(prompts, responses, strict=True)]
        missing = [index for index, verdict in enumerate(found) if verdict is None]
        if missing:
            pairs = [(prompts[index], responses[index]) for index in missing]
            new = self.judge.verdicts([p for p, _ in pairs], [r for _, r in pairs], choices)
            self.cache.put(key, pairs, new)
            self.asked += len(missing)
            for index, verdict in zip(missing, new, strict=True):
                found[index] = verdict
        return found
