"""Numbers on the command line, checked at the boundary.

Every numeric flag of every command is parsed by a `Bounded` type, so a value out of range is
refused by argparse itself (``error: argument -k/--top-k: must be an integer >= 1; got 0``,
exit code 2) before any work starts. The same objects check settings that come from a YAML
file or a resumed run's config (`recipes`), so the rule is written once.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Optional, Type, Union

__all__ = ['Bounded', 'OrWord', 'positive_int', 'non_negative_int', 'positive_float', 'non_negative_float',
           'probability', 'unit_interval']

Number = Union[int, float]


class Bounded:
    """An argparse type: `kind` (int or float) with value >= minimum (> minimum when `exclusive`)
    and <= maximum when given (< maximum when `exclusive_max`). ``Bounded(int, 1)('0')`` raises
    ArgumentTypeError; `check` gives the same message for a value from a file."""

    def __init__(self, kind: Type, minimum: Number, maximum: Optional[Number] = None,
                 exclusive: bool = False, exclusive_max: bool = False):
        if kind not in (int, float):
            raise TypeError(f'Bounded takes int or float, not {kind!r}')
        self.kind, self.minimum, self.maximum = kind, minimum, maximum
        self.exclusive, self.exclusive_max = exclusive, exclusive_max
        self.__name__ = self.describe()  # argparse names the type in some messages

    def describe(self) -> str:
        noun = 'an integer' if self.kind is int else 'a number'
        low = f'> {self.minimum}' if self.exclusive else f'>= {self.minimum}'
        high = ''
        if self.maximum is not None:
            high = f' and < {self.maximum}' if self.exclusive_max else f' and <= {self.maximum}'
        return f'{noun} {low}{high}'

    def check(self, value: Number) -> Optional[str]:
        """None when `value` is in range, else what is wrong with it."""
        if isinstance(value, float) and not math.isfinite(value):
            return f'must be {self.describe()}; got {value}'
        too_low = value <= self.minimum if self.exclusive else value < self.minimum
        too_high = self.maximum is not None and (value >= self.maximum if self.exclusive_max
                                                 else value > self.maximum)
        if too_low or too_high:
            return f'must be {self.describe()}; got {value}'
        return None

    def __call__(self, text: str) -> Number:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'must be {self.describe()}; got {text!r}') from None
        problem = self.check(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    def __repr__(self) -> str:
        return f'Bounded({self.describe()})'


positive_int = Bounded(int, 1)
non_negative_int = Bounded(int, 0)
positive_float = Bounded(float, 0, exclusive=True)
non_negative_float = Bounded(float, 0)
probability = Bounded(float, 0, 1)
unit_interval = Bounded(float, 0, 1, exclusive_max=True)  # [0, 1): drop-path, smoothing, Adam betas


class OrWord:
    """An argparse type: one of some words (returned lower-cased), else a number of `inner`'s range.

    ``OrWord(non_negative_int, 'auto')`` takes 'auto' or an integer >= 0."""

    def __init__(self, inner: Bounded, *words: str):
        self.inner, self.words = inner, tuple(w.lower() for w in words)
        # the range stays visible to whoever inspects the parser (tests/test_user_errors.py)
        self.kind, self.minimum, self.maximum = inner.kind, inner.minimum, inner.maximum
        self.exclusive = inner.exclusive
        self.__name__ = f"{' or '.join(repr(w) for w in self.words)} or {inner.describe()}"

    def __call__(self, text: str) -> Any:
        if text.lower() in self.words:
            return text.lower()
        try:
            return self.inner(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f'must be {self.__name__}; got {text!r}') from None

    def __repr__(self) -> str:
        return f'OrWord({self.__name__})'
