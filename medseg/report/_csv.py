"""CSV text for every CSV medseg writes, with cells escaped against formula injection.

A spreadsheet opening a CSV runs a cell that begins with ``=``, ``+``, ``-`` or ``@`` as a
formula (and some treat a leading tab or carriage return the same way), so a study id such
as ``=HYPERLINK(...)`` written raw would run in the user's spreadsheet. As the OWASP "CSV
Injection" guidance recommends, such a text cell is written with a single quote in front
(``'=HYPERLINK(...)``), which spreadsheets show as text. A field holding a comma, a double
quote, a line feed or a carriage return is quoted (RFC 4180), so a cell cannot break the row
either; :mod:`csv` reads the text back.

Numbers stay numbers: ints and floats (``-850.5``, ``-inf``) are never prefixed, and neither
is a text cell that is just a decimal number (``"-850.5"``, ``"+3"``, ``"1e-3"``), which
cannot be a formula.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from medseg.errors import OutputError

__all__ = ["FORMULA_PREFIXES", "csv_cell", "csv_text"]

#: First characters that make a spreadsheet read a cell as a formula (OWASP CSV Injection).
FORMULA_PREFIXES: Final = ("=", "+", "-", "@", "\t", "\r")
#: Characters that make a field quoted (as RFC 4180 asks for).
_QUOTE_IF: Final = (",", '"', "\r", "\n")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """``value`` safe for a CSV cell: a text beginning with one of
    :data:`FORMULA_PREFIXES` gets a leading ``'`` unless it is a plain decimal number;
    anything else is returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES) \
            and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_text(rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str] | None = None
             ) -> str:
    """The CSV text (header row, then one row per mapping; ``\\n`` line ends) of ``rows``,
    every cell passed through :func:`csv_cell`. Columns are ``fieldnames``, or the keys of
    the rows in first-seen order; a missing key is an empty cell, and a key that is not a
    column is an :class:`~medseg.errors.OutputError` (as :class:`csv.DictWriter`)."""
    rows = list(rows)
    fields = list(fieldnames) if fieldnames is not None else \
        list(dict.fromkeys(k for r in rows for k in r))
    known = set(fields)
    lines = [",".join(_field(csv_cell(f)) for f in fields)]
    for r in rows:
        extra = [k for k in r if k not in known]
        if extra:
            raise OutputError(f"CSV row has keys that are not columns: {extra}")
        lines.append(",".join(_field(csv_cell(r.get(f, ""))) for f in fields))
    return "\n".join(lines) + "\n"


def _field(value: Any) -> str:
    """One field as :mod:`csv`'s minimal quoting writes it (``str()`` of the value, None
    empty), except that a carriage return is quoted too: :class:`csv.writer` with ``\\n``
    line ends leaves a lone CR bare, and readers take it for the end of the row."""
    text = "" if value is None else str(value)
    if any(c in text for c in _QUOTE_IF):
        return '"' + text.replace('"', '""') + '"'
    return text
