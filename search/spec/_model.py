"""The strict base of every study-file model, and pydantic's errors as one clear line.

Validators raise ``spec_error(...)``: a ``PydanticCustomError`` whose context carries the
message and, where it is not the field being validated, the key it is about. `from_pydantic`
turns pydantic's first error into ``<key path>: <what was expected>, got <value>``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from search._errors import SpecError
from trainers import closest


def show(value: Any) -> str:
    """A value as the user wrote it in YAML: strings quoted, true/false/null, lists in brackets."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def spec_error(message: str, *, key: str | None = None) -> PydanticCustomError:
    """An error for `_spec` to report; ``key`` extends the location of the failing model."""
    context: dict[str, Any] = {"message": message}
    if key is not None:
        context["key"] = key
    return PydanticCustomError("spec", "{message}", context)


def did_you_mean(word: str, choices: list[str]) -> str:
    """``, did you mean 'x'?`` when a choice is close (the trainer's rule), else the empty
    string: a clause, where the trainer's own messages end in a sentence."""
    close = closest(word, choices)
    return f", did you mean {close!r}?" if close else ""


def same(a: Any, b: Any) -> bool:
    """Equality as a study file means it: true is not 1, and [128, 56] equals (128, 56)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (
            isinstance(a, (list, tuple))
            and isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and a == b or is_number(a) and is_number(b) and a == b


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> int | float:
    if not is_number(value):
        raise spec_error(f"expected a number, got {show(value)}")
    if not math.isfinite(value):
        raise spec_error(f"expected a finite number, got {show(value)}")
    return value


# A real number as YAML gives it: int stays int (bounds of integer ranges), bool is rejected.
Number = Annotated[int | float, PlainValidator(_number)]


_METRIC_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


def _metric_name(value: Any) -> str:
    # Any name here: a user's trainer reports its own metrics; the built-in trainer's are
    # checked by the study (`StudySpec._trainer`, `_constraints.check_constraints`).
    if isinstance(value, str) and _METRIC_NAME.match(value):
        return value
    raise spec_error(f"expected a metric name (letters, digits, '_' and '.'), got {show(value)}")


Metric = Annotated[str, PlainValidator(_metric_name)]


class SpecModel(BaseModel):
    """Strict base of every study-file section: unknown keys are errors that guess the typo."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True, validate_by_alias=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known:
                    guess = did_you_mean(str(key), known)
                    raise spec_error(
                        f"unknown key{guess} (expected one of: {', '.join(known)})", key=str(key)
                    )
        return data


_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "space_entry": "expected a search-space entry: a range {low, high}, {choices: [...]}, "
                   "{grid: [...]}, {pow2: [a, b]} or, for lr, {auto: true} (a constant "
                   "belongs under fixed)",
}


def _join(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        text = str(part)
        if isinstance(part, int):
            out += f"[{part}]"
        elif text.startswith("["):
            out += text
        else:
            out += f".{text}" if out else text
    return out


def from_pydantic(error: ValidationError) -> SpecError:
    """Pydantic's first error as one ``<key path>: <expected>, got <value>`` line."""
    first = error.errors()[0]
    context = first.get("ctx") or {}
    loc = [p for p in first["loc"] if not (isinstance(p, str) and p.startswith("<"))]
    if loc and loc[-1] == "[key]":  # a mapping's key, not its value, is wrong
        return fail(_join(loc[:-2]) or "(top level)",
                    f"expected string keys, got {show(first.get('input'))}")
    if "key" in context:
        loc.append(context["key"])
    path = _join(loc) or "(top level)"
    kind, value = first["type"], first.get("input")
    if kind == "spec":
        return fail(path, context["message"])
    if kind == "missing":
        return fail(path, "required key is missing")
    if kind == "greater_than_equal":
        return fail(path, f"expected at least {context['ge']}, got {show(value)}")
    if kind == "greater_than":
        return fail(path, f"expected a number greater than {context['gt']}, got {show(value)}")
    return fail(path, f"{_MESSAGES.get(kind, first['msg'])}, got {show(value)}")




def fail(path: str, detail: str) -> SpecError:
    """A SpecError reading ``<path>: <detail>``."""
    return SpecError(f"{path}: {detail}", path=path)
