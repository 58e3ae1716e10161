"""Reading values out of DICOM headers (pydicom datasets) without surprises: an absent or
empty value is ``None``, a value that does not parse is ``None`` (never an exception), a
non-finite number is ``None``. One set of readers for the loader (:mod:`medseg.io.dicom`)
and the DICOMweb records (:mod:`medseg.pacs.records`)."""

from __future__ import annotations

import math
from typing import Any

import pydicom
from pydicom.dataset import Dataset

__all__ = ["first", "first_float", "first_int", "integer", "number", "numbers", "strings",
           "text"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def text(ds: Dataset, keyword: str) -> str | None:
    """The value as stripped text; ``None`` when absent or blank."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def integer(ds: Dataset, keyword: str) -> int | None:
    """The (single) value as an int; ``None`` when absent or not a whole number."""
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def number(value: Any) -> float | None:
    """``value`` as a finite float; ``None`` when absent, unparsable or not finite."""
    try:
        out = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return None if out is None else _finite(out)


def numbers(value: Any, n: int) -> tuple[float, ...] | None:
    """A multi-value of exactly ``n`` finite floats, else ``None``."""
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        return None
    return vals


def first(ds: Dataset, keyword: str) -> Any:
    """The first value of a (multi-)value; ``None`` when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return value[0] if len(value) else None
    return value


def first_int(ds: Dataset, keyword: str) -> int | None:
    """The first value as an int, else ``None``."""
    v = first(ds, keyword)
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def first_float(ds: Dataset, keyword: str) -> float | None:
    """The first value as a finite float, else ``None``."""
    return number(first(ds, keyword))


def strings(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """Every value as text (one for a single value); ``()`` when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return tuple(str(v) for v in value)
    return (str(value),)
