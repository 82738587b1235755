"""Settings from the environment: django-environ, stricter about numbers and yes/no.

django-environ reads "0.5abc" as 0.5, "abc" as a float error about '', and any word it
does not know as false. Here a value that does not parse, or a number outside its bounds,
stops the start with an ImproperlyConfigured that names the variable and what it must be.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import environ
from django.core.exceptions import ImproperlyConfigured

NOTSET: Any = environ.Env.NOTSET
_FALSE_STRINGS = ("false", "off", "n", "no", "0", "")
N = TypeVar("N", int, float)


class StrictEnv(environ.Env):
    def int(  # type: ignore[override]
        self,
        var: str,
        default: Any = NOTSET,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        raw = self.ENVIRON.get(var)
        if raw is None:
            return super().int(var, default=default)
        try:
            value = int(raw.strip())
        except ValueError:
            raise ImproperlyConfigured(f"{var} must be a whole number, not {raw!r}.") from None
        return _bounded(var, value, minimum, maximum)

    def float(  # type: ignore[override]
        self,
        var: str,
        default: Any = NOTSET,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        raw = self.ENVIRON.get(var)
        if raw is None:
            return super().float(var, default=default)
        try:
            value = float(raw.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ImproperlyConfigured(f"{var} must be a number, not {raw!r}.")
        return _bounded(var, value, minimum, maximum)

    def bool(self, var: str, default: Any = NOTSET) -> bool:  # type: ignore[override]
        raw = self.ENVIRON.get(var)
        if raw is None:
            return super().bool(var, default=default)
        word = raw.strip().lower()
        if word in self.BOOLEAN_TRUE_STRINGS:
            return True
        if word in _FALSE_STRINGS:
            return False
        raise ImproperlyConfigured(f"{var} must be a yes or a no (1/0, true/false), not {raw!r}.")


def _bounded(var: str, value: N, minimum: N | None, maximum: N | None) -> N:
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{var} must be at least {minimum}, not {value}.")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{var} must be at most {maximum}, not {value}.")
    return value
