"""The four forms of a search-space entry, each with its mapping to and from Optuna.

Each entry maps 1:1 onto one Optuna distribution with Optuna's inclusive bounds:

- range  ``{low, high, log, step, int}`` → FloatDistribution, or IntDistribution for integers
- ``{choices: [...]}``                  → CategoricalDistribution
- ``{grid: [...]}``                     → CategoricalDistribution of the sorted, unique numbers
- ``{pow2: [a, b]}``                    → IntDistribution(log2 a, log2 b) named ``log2_<key>``
- ``{auto: true}`` (lr only)            → a log range found by the LR range test when the study is
                                          created; the stored spec holds that range, never auto

A range or auto lr may carry ``per_batch: 256``: lr is then sampled per 256 examples and the
trainer uses lr × batch_size / 256 (the linear scaling rule; `_knobs.constant_values` sets
``optimizer.lr_per_batch``).

Validators raise `spec_error`, which `_model.from_pydantic` turns into one clear line.
"""

from __future__ import annotations

import decimal
import math
from typing import Annotated, Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import (
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

from search._errors import SpecError
from search.spec._model import Number, SpecModel, is_number, same, show, spec_error


class Entry(SpecModel):
    """What every entry form shares: an optional condition, and the mapping to Optuna."""

    when: dict[str, Any] | None = None

    def optuna_name(self, key: str) -> str:
        """The Optuna parameter name of the space key ``key``."""
        return key

    def distribution(self) -> BaseDistribution:
        raise NotImplementedError

    def to_real(self, optuna_value: Any) -> Any:
        """The trainer's value for an Optuna parameter value."""
        return optuna_value

    def to_optuna(self, value: Any) -> Any:
        """The Optuna parameter value for a trainer value that `check_value` accepted."""
        return value

    def check_value(self, value: Any) -> str | None:
        """None when ``value`` can be sampled, else what was expected (for the error)."""
        raise NotImplementedError

    def discrete(self) -> bool:
        return True

    def grid(self) -> list[Any]:
        """Every Optuna value of a discrete entry, for the grid sampler."""
        raise NotImplementedError

class RangeEntry(Entry):
    """``{low, high, log: false, step: null, int: null}``: a float or integer range, inclusive."""

    low: Number
    high: Number
    log: StrictBool = False
    step: Number | None = None
    is_int: StrictBool | None = Field(None, alias="int")
    per_batch: StrictInt | None = Field(None, ge=1)  # lr per this many examples (Goyal)

    @model_validator(mode="after")
    def _check(self) -> RangeEntry:
        if self.is_int:
            for key in ("low", "high", "step"):
                value = getattr(self, key)
                if value is not None and float(value) != int(value):
                    raise spec_error(f"expected an integer (int: true), got {show(value)}", key=key)
        if self.log and self.low <= 0:
            hint = ""
            if self.high <= 0:
                hint = f" (bounds are values, not exponents: did you mean 1.0e{int(self.low)}?)"
            raise spec_error(
                f"expected a positive number for a log range, got {show(self.low)}{hint}", key="low"
            )
        if self.high <= self.low:
            swapped = " (are low and high swapped?)" if self.high < self.low else ""
            raise spec_error(
                f"expected a number greater than low ({show(self.low)}), got "
                f"{show(self.high)}{swapped}; to hold a value constant put it under fixed",
                key="high",
            )
        if self.step is not None:
            if self.log:
                raise spec_error(
                    f"a log range cannot have a step (Optuna takes one or the other), "
                    f"got {show(self.step)}",
                    key="step",
                )
            if self.step <= 0:
                raise spec_error(f"expected a positive number, got {show(self.step)}", key="step")
            span = decimal.Decimal(str(self.high)) - decimal.Decimal(str(self.low))
            steps = span / decimal.Decimal(str(self.step))
            if steps != steps.to_integral_value():
                # Optuna would quietly lower high to the last step; say so instead.
                last = decimal.Decimal(str(self.low)) + int(steps) * decimal.Decimal(str(self.step))
                raise spec_error(
                    f"expected low plus a whole number of steps ({show(self.step)}), such as "
                    f"{last.normalize()}, got {show(self.high)}",
                    key="high",
                )
        return self

    def as_int(self) -> RangeEntry:
        """This range with integer bounds (for a trainer setting that is an integer)."""
        step = None if self.step is None else int(self.step)
        return self.model_copy(
            update={"low": int(self.low), "high": int(self.high), "step": step, "is_int": True}
        )

    def distribution(self) -> BaseDistribution:
        if self.is_int:
            step = 1 if self.step is None else int(self.step)
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=step)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def to_optuna(self, value: Any) -> Any:
        return int(value) if self.is_int else value

    def check_value(self, value: Any) -> str | None:
        kind = "an integer" if self.is_int else "a number"
        expected = f"{kind} from {show(self.low)} to {show(self.high)}"
        if self.step is not None:
            expected += f" in steps of {show(self.step)}"
        if not is_number(value) or (self.is_int and float(value) != int(value)):
            return expected
        if not self.low <= value <= self.high:
            return expected
        if self.step is not None:
            k = (value - self.low) / self.step
            if abs(k - round(k)) > 1e-8:
                return expected
        return None

    def discrete(self) -> bool:
        # A stepped float range is discrete too, but float equality makes a poor grid or
        # condition; Optuna's GridSampler and `when` get integers, choices and grids.
        return bool(self.is_int)

    def grid(self) -> list[Any]:
        return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))

def _label(value: Any) -> Any:
    """Optuna choices are scalars; a list choice (``hidden: [128, 56]``) becomes "128,56"."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value

class ChoicesEntry(Entry):
    """``{choices: [...]}``: scalars, or lists of scalars for list settings such as hidden."""

    choices: list[Any]

    @field_validator("choices")
    @classmethod
    def _check_choices(cls, choices: list[Any]) -> list[Any]:
        if not choices:
            raise spec_error("expected at least one choice, got []")
        scalar = (str, int, float, bool, type(None))
        for i, value in enumerate(choices):
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, scalar) for v in items):
                raise spec_error(
                    f"expected a string, number, true/false, null or a list of those, "
                    f"got {show(value)}",
                    key=f"[{i}]",
                )
            for j in range(i):
                if same(value, choices[j]) or _label(value) == _label(choices[j]):
                    raise spec_error(f"expected distinct choices, got {show(value)} twice",
                                     key=f"[{i}]")
        return choices

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution([_label(v) for v in self.choices])

    def to_real(self, optuna_value: Any) -> Any:
        for value in self.choices:
            if same(_label(value), optuna_value):
                return value
        raise ValueError(f"{optuna_value!r} is not one of the choices {self.choices!r}")

    def to_optuna(self, value: Any) -> Any:
        return _label(self.to_real(_label(value)))

    def check_value(self, value: Any) -> str | None:
        if any(same(value, v) for v in self.choices):
            return None
        return f"one of {show(self.choices)}"

    def grid(self) -> list[Any]:
        return [_label(v) for v in self.choices]

class GridEntry(Entry):
    """``{grid: [0, 1.0e-5, 1.0e-4]}``: numbers tried as given (sorted and made unique)."""

    grid_values: list[Number] = Field(alias="grid")

    @field_validator("grid_values")
    @classmethod
    def _sorted_unique(cls, values: list[int | float]) -> list[int | float]:
        if not values:
            raise spec_error("expected at least one number, got []")
        unique: list[int | float] = []
        for value in sorted(values):
            if not unique or value != unique[-1]:
                unique.append(value)
        return unique

    def distribution(self) -> BaseDistribution:
        return CategoricalDistribution(self.grid_values)

    def to_optuna(self, value: Any) -> Any:
        return next(v for v in self.grid_values if v == value)

    def check_value(self, value: Any) -> str | None:
        if is_number(value) and any(value == v for v in self.grid_values):
            return None
        return f"one of the grid values {show(self.grid_values)}"

    def grid(self) -> list[Any]:
        return list(self.grid_values)

def _nearest_powers(value: int) -> str:
    if value < 1:
        return "1"
    below = 2 ** math.floor(math.log2(value))
    return f"{below} or {below * 2}"

def _is_pow2(value: Any) -> bool:
    return is_number(value) and value >= 1 and float(value).is_integer() and (
        int(value) & (int(value) - 1) == 0
    )

class Pow2Entry(Entry):
    """``{pow2: [32, 1024]}``: powers of two, searched as the ordinal exponent ``log2_<key>``."""

    pow2: list[StrictInt]

    @field_validator("pow2")
    @classmethod
    def _powers(cls, bounds: list[int]) -> list[int]:
        if len(bounds) != 2:
            raise spec_error(f"expected two powers of two [low, high], got {show(bounds)}")
        for i, value in enumerate(bounds):
            if not _is_pow2(value):
                raise spec_error(
                    f"expected a power of two (nearest: {_nearest_powers(value)}), got {value}",
                    key=f"[{i}]",
                )
        if bounds[1] <= bounds[0]:
            raise spec_error(
                f"expected a power of two greater than {bounds[0]}, got {bounds[1]}", key="[1]"
            )
        return bounds

    def optuna_name(self, key: str) -> str:
        return f"log2_{key}"

    def distribution(self) -> BaseDistribution:
        return IntDistribution(int(math.log2(self.pow2[0])), int(math.log2(self.pow2[1])))

    def to_real(self, optuna_value: Any) -> Any:
        return 2 ** int(optuna_value)

    def to_optuna(self, value: Any) -> Any:
        return int(math.log2(value))

    def check_value(self, value: Any) -> str | None:
        expected = f"a power of two from {self.pow2[0]} to {self.pow2[1]}"
        if not _is_pow2(value):
            if is_number(value) and value >= 1:
                return f"{expected} (nearest: {_nearest_powers(int(value))})"
            return expected
        if not self.pow2[0] <= value <= self.pow2[1]:
            return expected
        return None

    def grid(self) -> list[Any]:
        dist = self.distribution()
        assert isinstance(dist, IntDistribution)
        return list(range(dist.low, dist.high + 1))

class AutoEntry(Entry):
    """``{auto: true, per_batch: null}``: an lr range the LR range test finds at `run`.

    A placeholder until then: it has no distribution, and `search.run._lr_find.resolve`
    replaces it with a log `RangeEntry` before the spec is stored with the study.
    """

    auto: StrictBool
    per_batch: StrictInt | None = Field(None, ge=1)

    @field_validator("auto")
    @classmethod
    def _true(cls, value: bool) -> bool:
        if not value:
            raise spec_error("expected true (to search a range give {low, high, log: true}), "
                             "got false")
        return value

    def distribution(self) -> BaseDistribution:
        raise SpecError("space.lr: {auto: true} has no range until the LR range test runs "
                        "(hpsearch run does it when it creates the study)")

    def check_value(self, value: Any) -> str | None:
        # The range is not known yet; the range test's range is widened to cover enqueued lrs.
        return None if is_number(value) and value > 0 else "a positive number"

    def discrete(self) -> bool:
        return False

_FORMS = {"choices": "<choices>", "grid": "<grid>", "pow2": "<pow2>", "auto": "<auto>"}
_CLASSES = {RangeEntry: "<range>", ChoicesEntry: "<choices>", GridEntry: "<grid>",
            Pow2Entry: "<pow2>", AutoEntry: "<auto>"}

def _entry_form(value: Any) -> str | None:
    """Which form an entry is, by its keys; None (an error) for a non-mapping or a mixture."""
    if isinstance(value, Entry):
        return _CLASSES[type(value)]
    if not isinstance(value, dict):
        return None
    forms = [tag for key, tag in _FORMS.items() if key in value]
    if "low" in value or "high" in value:
        forms.append("<range>")
    if len(forms) > 1:
        return None
    return forms[0] if forms else "<range>"

SpaceEntry = Annotated[
    Annotated[RangeEntry, Tag("<range>")]
    | Annotated[ChoicesEntry, Tag("<choices>")]
    | Annotated[GridEntry, Tag("<grid>")]
    | Annotated[Pow2Entry, Tag("<pow2>")]
    | Annotated[AutoEntry, Tag("<auto>")],
    Discriminator(_entry_form, custom_error_type="space_entry",
                  custom_error_message="not a search-space entry"),
]
