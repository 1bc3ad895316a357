"""Which settings change what a trial measures (`measured()`): a study resumes only with the
same values of them (Settings.measurement_fingerprint). A leaf of the settings: it knows the
methods' names from their registry, which is plain data."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from apostate.methods import METHODS as REGISTERED_METHODS

METHODS: tuple[str, ...] = tuple(REGISTERED_METHODS)
MethodName = Literal[METHODS]  # the names in the methods' registry


def methods_using(table: str) -> tuple[str, ...]:
    """The methods whose knobs are the settings table `table`."""
    return tuple(name for name, (_, key) in REGISTERED_METHODS.items() if key == table)


def measured(
    default: Any = PydanticUndefined, *, methods: tuple[str, ...] = METHODS, added_later: bool = False, **kwargs: Any
) -> Any:
    """`Field(default, **kwargs)` of a setting that changes what a trial measures (in its json_schema_extra).

    A study resumes only with the same value; `methods`: only runs of these methods count it.
    `added_later`: a setting added after studies existed, in the fingerprint only when set away
    from its default (those studies measured it at the default, and still resume).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}")
    extra: dict = {"measured": True}
    if set(methods) != set(METHODS):
        extra["measured_for"] = list(methods)
    if added_later:
        extra["added_later"] = True
    return Field(default, json_schema_extra=extra, **kwargs)


def measured_for(field: FieldInfo) -> tuple[str, ...]:
    """The methods whose trials this setting changes: none when it is not `measured()`."""
    extra = field.json_schema_extra
    if not isinstance(extra, dict) or not extra.get("measured"):
        return ()
    return tuple(extra.get("measured_for") or METHODS)


def at_earlier_default(field: FieldInfo, value: Any) -> bool:
    """A setting added after studies existed, at its default: left out of the fingerprint."""
    extra = field.json_schema_extra
    added_later = isinstance(extra, dict) and extra.get("added_later")
    return bool(added_later) and value == field.get_default(call_default_factory=True)


def measured_table(table: BaseModel) -> dict:
    """A settings table as fingerprinted: without its fields added later and left at their defaults."""
    fields = type(table).model_fields
    return {
        key: value
        for key, value in table.model_dump().items()
        if not at_earlier_default(fields[key], getattr(table, key))
    }
