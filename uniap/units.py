"""Quantities in human units: "40 GiB" -> 42949672960.0, and back.

Cluster files are written in units ("40 GiB", "300 GB/s", "25 Gb/s", "5 us", "312 TFLOP/s");
:func:`parse_quantity` turns them into SI floats (bytes, bytes/s, seconds, FLOP/s) with
Decimal arithmetic, so "5 us" is exactly ``float("5e-6")``, and :func:`format_quantity`
writes an SI value in the largest short unit that parses back exactly. Bandwidths in bits
(``Gb/s``) are divided by 8. The checks shared by file readers (:func:`check_number`,
:func:`check_choice`) raise one ConfigError naming the field, the value and an example.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from decimal import Decimal, localcontext
from typing import Any

from uniap.errors import ConfigError

__all__ = [
    "QUANTITY_EXAMPLES",
    "check_choice",
    "check_number",
    "count",
    "did_you_mean",
    "format_quantity",
    "parse_quantity",
]

_SI = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_MICRO = Decimal("1e-6")
_UNITS: dict[str, dict[str, Decimal]] = {  # unit -> SI factor, per kind of quantity
    "memory": {f"{p}B": Decimal(f) for p, f in (_SI | _BINARY).items()} | {"bytes": Decimal(1)},
    "bandwidth": {f"{p}B/s": Decimal(f) for p, f in (_SI | _BINARY).items()}
    | {f"{p}{b}": Decimal(f) / 8 for p, f in _SI.items() for b in ("b/s", "bit/s", "bps")},
    "latency": {"s": Decimal(1), "ms": Decimal("1e-3"), "us": _MICRO, "µs": _MICRO, "μs": _MICRO}
    | {"ns": Decimal("1e-9")},
    "flops": {f"{p}{s}": Decimal(f) for p, f in _SI.items() for s in ("FLOP/s", "FLOPS")},
}
# The units format_quantity tries, largest first, and error messages show.
_OUT_UNITS = {
    "memory": ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "kB", "B"),
    "bandwidth": ("TB/s", "GB/s", "MB/s", "kB/s", "B/s"),
    "latency": ("s", "ms", "us", "ns"),
    "flops": ("PFLOP/s", "TFLOP/s", "GFLOP/s", "MFLOP/s", "FLOP/s"),
}
QUANTITY_EXAMPLES = {
    "memory": "40 GiB",
    "flops": "312 TFLOP/s",
    "bandwidth": "300 GB/s",
    "latency": "5 us",
}
"""One example per kind of quantity, shown in error messages."""
_NEEDS = {"count": "a positive integer", "positive": "a positive number", "fraction": "in (0, 1]"}
_QUANTITY = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(.*?)\s*")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    same = [c for c in choices if c.lower() == word.lower()]  # "gib" -> "GiB"
    close = same or difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_number(
    value: object, where: str, example: str, need: str = "positive", shown: object = None
) -> Any:
    """`value` as an int ("count") or float, else a ConfigError "e.g. {leaf}: {example}"."""
    ok = not isinstance(value, bool) and isinstance(value, int if need == "count" else int | float)
    if ok and need == "fraction":
        ok = 0 < value <= 1  # type: ignore[operator]
    elif ok:
        ok = math.isfinite(value) and value > 0  # type: ignore[arg-type,operator]
    if not ok:
        shown = value if shown is None else shown
        leaf = re.split(r"[ .]", where)[-1]
        raise ConfigError(f"{where} must be {_NEEDS[need]}, got {shown!r}; e.g. {leaf}: {example}")
    return value if need == "count" else float(value)  # type: ignore[arg-type]


def check_choice(value: object, choices: tuple[str, ...], where: str) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}{hint}")
    return value


def parse_quantity(
    value: object, kind: str, where: str = "value", *, unit_required: bool = False
) -> float:
    """Parse "40 GiB", "25 Gb/s", "5 us", "312 TFLOP/s" (or a plain SI number) to SI units.

    `kind` is "memory", "bandwidth", "latency" or "flops"; `where` prefixes error messages.
    `unit_required` (cluster files) refuses a number without a unit, suggesting one.
    """
    units, example, shown = _UNITS[kind], QUANTITY_EXAMPLES[kind], value
    if unit_required:
        _refuse_bare_number(value, kind, where)
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value)
        if match is None:
            raise ConfigError(
                f"{where} must be a number with a {kind} unit, got {value!r}; "
                f"e.g. {re.split(r'[ .]', where)[-1]}: {example}"
            )
        number, unit = match.groups()
        if unit and unit not in units:
            other = next((k for k, u in _UNITS.items() if unit in u), None)
            problem = f"{unit!r} is a {other} unit" if other else f"unknown unit {unit!r}"
            valid = ", ".join(_OUT_UNITS[kind][::-1])
            valid += " (bytes), Mb/s, Gb/s (bits)" if kind == "bandwidth" else ""
            raise ConfigError(
                f"{where}: {problem} in {value!r}{did_you_mean(unit, units)}, but a {kind} is "
                f"needed; use one of {valid}; e.g. {re.split(r'[ .]', where)[-1]}: {example}"
            )
        with localcontext() as ctx:
            ctx.prec = 80
            value = float(Decimal(number) * units.get(unit, Decimal(1)))
    return check_number(value, where, example, shown=shown)


# A bare number this large is plausibly already SI (bytes, B/s, FLOP/s) and a latency this
# small plausibly seconds: the hint shows it in units; otherwise the usual unit is suggested.
_SI_LOOKING = {"memory": 2**20, "bandwidth": 1e6, "flops": 1e9}
_USUAL_UNIT = {"memory": "GiB", "bandwidth": "GB/s", "latency": "us", "flops": "TFLOP/s"}


def _refuse_bare_number(value: object, kind: str, where: str) -> None:
    """A ConfigError for a number without a unit (YAML number, or a string of digits alone)."""
    if isinstance(value, str):
        match = _QUANTITY.fullmatch(value)
        if match is None or match.group(2):
            return
        number = float(match.group(1))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        return
    if not (math.isfinite(number) and number > 0):
        return  # the usual "must be positive" error says more
    si_like = number >= _SI_LOOKING[kind] if kind in _SI_LOOKING else number < 1e-2
    text = f"{value:g}" if isinstance(value, int | float) else value.strip()
    hint = format_quantity(number, kind) if si_like else f"{text} {_USUAL_UNIT[kind]}"
    leaf = re.split(r"[ .]", where)[-1]
    raise ConfigError(
        f"{where}: {text} has no unit; did you mean {hint}? A {kind} needs a unit, "
        f"e.g. {leaf}: {QUANTITY_EXAMPLES[kind]}"
    )


def format_quantity(value: float, kind: str) -> str:
    """Write an SI `value` in the largest short unit of `kind` that parses back exactly."""
    if not (math.isfinite(value) and value > 0):
        return repr(value)
    exact = Decimal(repr(float(value)))
    with localcontext() as ctx:
        ctx.prec = 80
        for unit in _OUT_UNITS[kind]:
            q = (exact / _UNITS[kind][unit]).normalize()
            text = f"{q:f} {unit}"
            short = 1 <= q < 10**6 and len(q.as_tuple().digits) <= 17
            if short and parse_quantity(text, kind) == value:
                return text
    si_unit = next(u for u, factor in _UNITS[kind].items() if factor == 1)  # B, B/s, s, FLOP/s
    return f"{float(value)!r} {si_unit}"


# ---------------------------------------------------------------------- human units
def count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 device"``, ``"4 devices"``, ``"2 micro-batches"`` (``plural``: the noun's plural
    where it is not ``noun + "s"``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def fmt_seconds(s: float | None) -> str:
    """``0.0123`` -> ``12.3 ms``: us, ms, s or min with three significant digits, no exponent."""
    if s is None or not isinstance(s, int | float) or math.isnan(s):
        return "-"
    if math.isinf(s):
        return "inf"
    if s == 0:
        return "0 s"
    for unit, scale in (("min", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale * (10 if unit == "min" else 1) or unit == "us":
            return f"{_sig3(s / scale)} {unit}"
    raise AssertionError  # pragma: no cover


def fmt_bytes(n: float | None) -> str:
    """``3.2e9`` -> ``2.98 GiB``: B, KiB, MiB, GiB or TiB with three significant digits."""
    if n is None or not isinstance(n, int | float) or math.isnan(n):
        return "-"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{_sig3(n / scale)} {unit}"
    return f"{n:.0f} B"


def _sig3(v: float) -> str:
    a = abs(v)
    if a >= 100 or a == 0:
        return f"{v:.0f}"
    return f"{v:.1f}" if a >= 10 else f"{v:.2f}"
