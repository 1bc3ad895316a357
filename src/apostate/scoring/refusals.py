"""Deciding whether a response is a refusal: marker strings after text normalization."""

from __future__ import annotations

import re

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_MARKDOWN = re.compile(r"[*_#>~|]+")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, straight apostrophes, no markdown emphasis/headers, single spaces."""
    text = text.translate(_APOSTROPHES).lower()
    text = _MARKDOWN.sub("", text)
    return _SPACE.sub(" ", text).strip()


class RefusalDetector:
    def __init__(self, markers: list[str]):
        self.markers = sorted({normalize(marker) for marker in markers if normalize(marker)})

    def is_refusal(self, response: str) -> bool:
        """Empty responses count as refusals: the model declined to answer."""
        text = normalize(response)
        return not text or any(marker in text for marker in self.markers)

    def decided(self, response: str) -> bool:
        """True once the response is known to be a refusal, however it continues."""
        text = normalize(response)
        return bool(text) and any(marker in text for marker in self.markers)
