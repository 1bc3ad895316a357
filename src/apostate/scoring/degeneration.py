"""Cheap checks for a broken response, run with every judge: no model, microseconds each.

They only flag what is broken beyond doubt (a judge model refines the rest):
* a loop: some run of n ≥ 2 words (numbers ignored, so "1. Hydrogen peroxide" and "2. Hydrogen
  peroxide" count as the same) that occurs at least `LOOP_REPEATS` times and whose occurrences
  cover at least `LOOP_COVER` of the response's words; runs of `PHRASE_WORDS` words said twice
  (not overlapping, and not mostly the request's words: restating the request is no loop) that
  together cover at least `PHRASE_COVER` of the words; or one character repeated
  `CHARACTER_RUN` times in a row (not the - = _ * # . ~ of rules and underlines);
* an echo: the response is one question made of the request's own words (at least `ECHO_SHARE`
  of its words are the request's) instead of an answer;
* the wrong script: more than `FOREIGN_SHARE` of the letters are in a writing system (Latin,
  CJK, Cyrillic, ...) that the prompt does not use — an English request answered in Chinese;
* garbage words: more than `MIXED_SHARE` of the words mix writing systems inside one word.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

LOOP_REPEATS = 3
LOOP_COVER = 0.5
CHARACTER_RUN = 16
FOREIGN_SHARE = 0.3
MIXED_SHARE = 0.2
MIN_WORDS = 6  # shorter responses say too little to call a loop
PHRASE_WORDS = 10
# A share, not a count: a long answer's list items reuse a phrase ("from a computer that is not
# connected to the internet") without looping. Any answer of up to 2 · PHRASE_WORDS / PHRASE_COVER
# = 40 words with one phrase said twice is still a loop, so short checks are unchanged.
PHRASE_COVER = 0.5
ECHO_SHARE = 0.6

_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)  # letters only: numbers and punctuation do not count
_SENTENCE_END = re.compile(r"[.!?\n]")
_RUN = re.compile(rf"([^\s\-=_*#.~])\1{{{CHARACTER_RUN - 1},}}")  # rules and underlines are not loops


def broken_reason(prompt: str, response: str) -> str | None:
    """Why the response is broken ('repetition loop', 'echoes the request', 'wrong language',
    'garbage words'), or None."""
    words = [word.lower() for word in _WORD.findall(response)]
    asked = {word.lower() for word in _WORD.findall(prompt)}
    if _RUN.search(response) or (len(words) >= MIN_WORDS and _loop_cover(words) >= LOOP_COVER):
        return "repetition loop"
    if words and _repeated_phrase_cover(words, asked) >= PHRASE_COVER:
        return "repetition loop"
    if _echoes(response, words, asked):
        return "echoes the request"
    letters = [_script(char) for char in response if char.isalpha()]
    if letters:
        allowed = {_script(char) for char in prompt if char.isalpha()} | {"LATIN"}
        foreign = sum(script not in allowed for script in letters)
        if foreign / len(letters) > FOREIGN_SHARE:
            return "wrong language"
    if words and sum(len({_script(char) for char in word}) > 1 for word in words) / len(words) > MIXED_SHARE:
        return "garbage words"
    return None


def _repeated_phrase_cover(words: list[str], asked: set[str]) -> float:
    """The share of the words inside runs of PHRASE_WORDS words that occur twice without
    overlapping (both occurrences count), leaving out runs made mostly of the request's words."""
    first_seen: dict[tuple[str, ...], int] = {}
    covered: set[int] = set()
    for start in range(len(words) - PHRASE_WORDS + 1):
        phrase = tuple(words[start : start + PHRASE_WORDS])
        first = first_seen.setdefault(phrase, start)
        if start - first >= PHRASE_WORDS and sum(word in asked for word in phrase) <= PHRASE_WORDS / 2:
            covered.update(range(first, first + PHRASE_WORDS))
            covered.update(range(start, start + PHRASE_WORDS))
    return len(covered) / len(words)


def _echoes(response: str, words: list[str], asked: set[str]) -> bool:
    text = response.strip().rstrip('"').rstrip()
    if not words or not text.endswith("?") or _SENTENCE_END.search(text[:-1]):
        return False  # an echo is one question, nothing else
    return sum(word in asked for word in words) / len(words) >= ECHO_SHARE


def _loop_cover(words: list[str]) -> float:
    """The largest share of the words covered by non-overlapping repeats of one n-gram (n ≥ 2)
    that occurs at least LOOP_REPEATS times."""
    best = 0.0
    for n in range(2, len(words) // LOOP_REPEATS + 1):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        gram, count = grams.most_common(1)[0]
        if count < LOOP_REPEATS:
            continue
        covered, i = 0, 0
        while i <= len(words) - n:
            if tuple(words[i : i + n]) == gram:
                covered, i = covered + n, i + n
            else:
                i += 1
        best = max(best, covered / len(words))
    return best


def _script(char: str) -> str:
    """The writing system of a letter, from its Unicode name: LATIN, CJK, CYRILLIC, ARABIC, ..."""
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"
