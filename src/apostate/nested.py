"""Nested dicts (settings, identities, records) compared key by key: the one place that says
which dotted keys differ."""

from __future__ import annotations


def flat(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    found = {}
    for key, value in data.items():
        if isinstance(value, dict):
            found.update(flat(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def changed_keys(before: dict, after: dict) -> list[str]:
    """The dotted keys whose values differ between two nested dicts (missing on one side counts), sorted."""
    old, new = flat(before), flat(after)
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def agrees_on(stored, current) -> bool:
    """Whether what was stored for `stored` holds for `current`: equal, except that a stored dict
    may name more keys than `current` does (a setting no longer measured, such as directional's
    knobs in an ARA run made before they had their own table)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return current.keys() <= stored.keys() and all(agrees_on(stored[k], v) for k, v in current.items())
    return stored == current
