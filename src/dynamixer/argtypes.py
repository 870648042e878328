"""Numbers on the command line, checked at the boundary.

Every numeric flag of every command is parsed by a `Bounded` type, so a value out of range is
refused by argparse itself (``error: argument -k/--top-k: must be an integer >= 1; got 0``,
exit code 2) before any work starts. The same objects check settings that come from a YAML
file or a resumed run's config (`recipes`), so the rule is written once.
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Type, Union

__all__ = ['Bounded', 'positive_int', 'non_negative_int', 'positive_float', 'non_negative_float',
           'probability']

Number = Union[int, float]


class Bounded:
    """An argparse type: `kind` (int or float) with value >= minimum (> minimum when exclusive)
    and <= maximum when given. ``Bounded(int, 1)('0')`` raises ArgumentTypeError."""

    def __init__(self, kind: Type, minimum: Number, maximum: Optional[Number] = None,
                 exclusive: bool = False):
        if kind not in (int, float):
            raise TypeError(f'Bounded takes int or float, not {kind!r}')
        self.kind, self.minimum, self.maximum, self.exclusive = kind, minimum, maximum, exclusive
        self.__name__ = self.describe()  # argparse names the type in some messages

    def describe(self) -> str:
        noun = 'an integer' if self.kind is int else 'a number'
        low = f'> {self.minimum}' if self.exclusive else f'>= {self.minimum}'
        high = f' and <= {self.maximum}' if self.maximum is not None else ''
        return f'{noun} {low}{high}'

    def check(self, value: Number) -> Optional[str]:
        """None when `value` is in range, else what is wrong with it."""
        too_low = value <= self.minimum if self.exclusive else value < self.minimum
        if isinstance(value, float) and not math.isfinite(value):
            return f'must be {self.describe()}; got {value}'
        if too_low or (self.maximum is not None and value > self.maximum):
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
