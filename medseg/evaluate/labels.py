"""Label conventions of lung label maps, checked before anything is scored.

medseg's masks label the right lung 1 and the left lung 2 (lungmask's convention). References
come in others: a binary lung mask (0/1), a mask with 255, a Chest Imaging Platform (CIP)
label map. Read in the wrong convention, a perfect lung scores Dice 0, so every label map is
read *through a convention* and its values are checked against it: a value the convention
does not name is an :class:`~medseg.errors.InputError` that names the file, the values found
and the option to use. Nothing is ignored silently.

Grammar of a convention (``medseg evaluate --pred-labels/--ref-labels``, the ``pred_labels``
and ``ref_labels`` arguments of :func:`score_label_maps` and :mod:`medseg.validation`)::

    SPEC   := PRESET | GROUP ("," GROUP)*
    PRESET := "auto" | "medseg" | "lungmask" | "cip"
    GROUP  := NAME "=" VALUES
    NAME   := "right" | "left" | "lung" | "background"
    VALUES := ITEM ("+" ITEM)*
    ITEM   := N | N "-" N            (whole numbers >= 1; "N-M" is N to M inclusive)

Case and spaces do not matter. Examples: ``right=1,left=2`` (= ``medseg`` = ``lungmask``),
``lung=1``, ``lung=255``, ``lung=1-255``, ``right=1,left=2,background=3-20`` (other labelled
structures, read as background), ``right=12-14+2+4-6,left=9-11+3+7-8``. Rules: 0 is always
background; a spec names either ``lung`` (one label for both lungs) or both ``right`` and
``left``; no value is in two groups.

* ``auto`` (the reference's default): ``right=1,left=2``, except that a map holding only 0 and
  1 is read as ``lung=1`` (a binary lung mask), with a note saying so. Anything else is an
  error. The prediction's default is ``right=1,left=2`` without that exception: a right/left
  prediction that missed its left lung also holds only 0 and 1, and must stay a failure.
* ``cip``: a CIP label map, value = region + 256 x type (``ChestConventions.xml``). The
  region (the low byte) decides, whatever the type (airway, vessel, ...): right lung = regions
  2 RightLung, 4-6 right lobes, 12-14 right thirds; left lung = 3 LeftLung, 7-8 left lobes,
  9-11 left thirds; 1 WholeLung is lung of no side; 0 (undefined) and 15-255 (mediastinum,
  heart, ...) are background. Values above 65535 or negative are errors.

A label map is turned into medseg's labels (0 background, 1 right, 2 left, 3 lung of no
side). Right, left and both lungs together (``lung``) are scored when both maps tell the
sides apart; otherwise only ``lung``, and a note says why.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from medseg.errors import ConfigError, InputError
from medseg.evaluate.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    LUNG_LABELS,
    distinct_values,
    label_metrics,
)

__all__ = [
    "DEFAULT_PRED_LABELS",
    "DEFAULT_REF_LABELS",
    "LabelConvention",
    "LabelScore",
    "Preset",
    "ResolvedLabels",
    "Structure",
    "as_label_array",
    "resolve_labels",
    "score_label_maps",
    "score_resolved",
]


class Structure(str, Enum):
    """What a group of label values marks."""

    RIGHT = "right"
    LEFT = "left"
    LUNG = "lung"  # both lungs, one label: no side
    BACKGROUND = "background"


class Preset(str, Enum):
    """Named conventions."""

    AUTO = "auto"
    MEDSEG = "medseg"
    LUNGMASK = "lungmask"
    CIP = "cip"


#: medseg's labels after conversion (the value of each structure in the converted map).
CODES: Final[Mapping[Structure, int]] = {Structure.BACKGROUND: 0, Structure.RIGHT: 1,
                                         Structure.LEFT: 2, Structure.LUNG: 3}
#: Label groups scored when a map cannot tell right from left: every lung voxel.
LUNG_ONLY: Final[Mapping[str, tuple[int, ...]]] = {"lung": (1, 2, 3)}
#: CIP regions (``ChestConventions.xml``, ChestRegions) -> medseg label; other regions are
#: background. 1 WholeLung; 2 RightLung, 4-6 right superior/middle/inferior lobe, 12-14 right
#: upper/middle/lower third; 3 LeftLung, 7-8 left superior/inferior lobe, 9-11 left thirds.
CIP_REGIONS: Final[Mapping[int, int]] = {
    1: 3,
    **dict.fromkeys((2, 4, 5, 6, 12, 13, 14), 1),
    **dict.fromkeys((3, 7, 8, 9, 10, 11), 2),
}
#: The largest CIP value: region and type are one byte each.
CIP_MAX: Final = 0xFFFF
#: The largest label value a spec may name (a 32-bit label map's range).
MAX_VALUE: Final = 2**31 - 1
#: Values listed in an error message before the rest are counted.
_SHOW_VALUES: Final = 16
#: Label value ranges up to this size are converted through a lookup table.
_LUT_LIMIT: Final = 1 << 20

_GROUP_RE = re.compile(r"^([a-z_]+)=(.*)$")
_ITEM_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LabelConvention:
    """How the values of a label map name the lungs: a :class:`Preset` or value groups.

    Make one with :meth:`parse`; ``str()`` gives the canonical spec (``right=1,left=2``,
    ``lung=1-255``, ``cip``, ``auto``), which :meth:`parse` reads back.
    """

    preset: Preset | None
    groups: tuple[tuple[Structure, Ranges], ...] = ()

    # -- parsing ----------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | LabelConvention) -> LabelConvention:
        """Read a spec (see the module doc for the grammar); raise
        :class:`~medseg.errors.ConfigError` with the reason and a close match for a typo."""
        if isinstance(spec, LabelConvention):
            return spec
        if not isinstance(spec, str):
            raise ConfigError(f"a label convention is a text such as 'right=1,left=2', got "
                              f"{type(spec).__name__} {spec!r}")
        text = "".join(spec.split()).lower()
        if not text:
            raise ConfigError("empty label convention; give e.g. 'right=1,left=2', 'lung=1', "
                              "'lung=1-255' or 'cip'")
        if "=" not in text:
            names = [p.value for p in Preset]
            try:
                preset = Preset(text)
            except ValueError:
                raise ConfigError(
                    f"unknown label convention {spec!r}{_did_you_mean(text, names)}; give "
                    f"a preset ({', '.join(names)}) or groups such as 'right=1,left=2', "
                    "'lung=1' or 'lung=1-255'") from None
            if preset in (Preset.MEDSEG, Preset.LUNGMASK):
                return MEDSEG
            return cls(preset)
        groups: dict[Structure, Ranges] = {}
        for part in text.split(","):
            groups.update([_parse_group(part, spec, groups)])
        conv = cls(None, tuple(sorted(groups.items(), key=lambda kv: list(Structure).index(
            kv[0]))))
        _check_groups(conv, spec)
        return conv

    # -- properties -------------------------------------------------------------------
    def __str__(self) -> str:
        if self.preset is not None:
            return self.preset.value
        return ",".join(f"{s.value}=" + "+".join(str(a) if a == b else f"{a}-{b}"
                                                 for a, b in r) for s, r in self.groups)

    @property
    def sided(self) -> bool:
        """Whether this convention can tell right from left (``cip`` can, unless the map
        holds WholeLung voxels; ``auto`` is decided per map)."""
        if self.preset is not None:
            return self.preset is not Preset.AUTO
        return any(s is Structure.RIGHT for s, _ in self.groups)

    def codes(self, values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """medseg's label (0-3) of each value, -1 where the convention does not name it.
        Not for ``auto``, which :func:`resolve_labels` first turns into a convention."""
        v = np.asarray(values, dtype=np.int64)
        out = np.full(v.shape, -1, np.int64)
        if self.preset is Preset.CIP:
            ok = (v >= 0) & (v <= CIP_MAX)
            lut = np.zeros(256, np.int64)
            for region, code in CIP_REGIONS.items():
                lut[region] = code
            out[ok] = lut[v[ok] & 0xFF]
            return out
        if self.preset is not None:
            raise ValueError(f"codes() of the preset {self.preset.value!r}")
        out[v == 0] = 0
        for structure, ranges in self.groups:
            for a, b in ranges:
                out[(v >= a) & (v <= b)] = CODES[structure]
        return out


def _parse_group(part: str, spec: str, seen: Mapping[Structure, Ranges]
                 ) -> tuple[Structure, Ranges]:
    m = _GROUP_RE.match(part)
    if not m:
        raise ConfigError(f"label convention {spec!r}: {part!r} is not NAME=VALUES (e.g. "
                          "'right=1', 'lung=1-255', 'left=2+9-11')")
    name, values = m.groups()
    names = [s.value for s in Structure]
    try:
        structure = Structure(name)
    except ValueError:
        raise ConfigError(f"label convention {spec!r}: unknown name {name!r}"
                          f"{_did_you_mean(name, names)}; names: {', '.join(names)}") from None
    if structure in seen:
        raise ConfigError(f"label convention {spec!r}: {name!r} is given twice; join its "
                          "values with '+', e.g. 'lung=1+255'")
    ranges: list[tuple[int, int]] = []
    for item in values.split("+"):
        im = _ITEM_RE.match(item)
        if not im:
            raise ConfigError(f"label convention {spec!r}: {item!r} in {part!r} is not a "
                              "whole number or a range N-M (values >= 1; 0 is background)")
        a = int(im.group(1))
        b = int(im.group(2)) if im.group(2) is not None else a
        if a < 1 or b < a or b > MAX_VALUE:
            raise ConfigError(f"label convention {spec!r}: {item!r} must be values from 1 to "
                              f"{MAX_VALUE}, low to high (0 is always background)")
        ranges.append((a, b))
    return structure, tuple(sorted(ranges))


def _check_groups(conv: LabelConvention, spec: str) -> None:
    names = {s for s, _ in conv.groups}
    if Structure.LUNG in names and names & {Structure.RIGHT, Structure.LEFT}:
        raise ConfigError(f"label convention {spec!r}: give either 'lung' (one label for "
                          "both lungs) or 'right' and 'left', not both")
    if (Structure.RIGHT in names) != (Structure.LEFT in names):
        raise ConfigError(f"label convention {spec!r}: 'right' and 'left' go together; for a "
                          "mask of both lungs as one label use 'lung=...'")
    if not names - {Structure.BACKGROUND}:
        raise ConfigError(f"label convention {spec!r} names no lung; add 'lung=...' or "
                          "'right=...,left=...'")
    spans = sorted((a, b, s) for s, r in conv.groups for a, b in r)
    for (_a1, b1, s1), (a2, _b2, s2) in itertools.pairwise(spans):
        if a2 <= b1:
            where = f"{s1.value} and {s2.value}" if s1 is not s2 else s1.value
            raise ConfigError(f"label convention {spec!r}: value {a2} is given twice "
                              f"({where})")


#: medseg's own convention: 1 right lung, 2 left lung.
MEDSEG: Final = LabelConvention(None, ((Structure.RIGHT, ((1, 1),)),
                                       (Structure.LEFT, ((2, 2),))))
#: A binary lung mask: 1 both lungs.
BINARY: Final = LabelConvention(None, ((Structure.LUNG, ((1, 1),)),))
AUTO: Final = LabelConvention(Preset.AUTO)
#: Defaults of ``medseg evaluate`` and :mod:`medseg.validation`.
DEFAULT_PRED_LABELS: Final = str(MEDSEG)
DEFAULT_REF_LABELS: Final = str(AUTO)


# -- label maps ------------------------------------------------------------------------
def as_label_array(arr: Any, *, path: str | Path | None = None, role: str = "volume"
                   ) -> npt.NDArray[Any]:
    """``arr`` as an integer array: booleans as 0/1, floats that are whole numbers as int64;
    other floats (or NaN) are an :class:`~medseg.errors.InputError` naming ``path``."""
    a = np.asarray(arr)
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not bool(np.all(np.isfinite(a))) or not np.array_equal(a, np.round(a)):
            raise InputError(f"not a label map: the {role} holds non-integer values",
                             path=path)
        return a.astype(np.int64)
    raise InputError(f"not a label map: the {role} has dtype {a.dtype}", path=path)


def _fmt_values(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_SHOW_VALUES])
    more = len(values) - _SHOW_VALUES
    return shown + (f", ... ({len(values)} values in all)" if more > 0 else "")


def _suggest(nonzero: Sequence[int], flag: str) -> str:
    """What to pass for a map holding the non-zero ``nonzero`` values."""
    vals = list(nonzero)
    if not vals:
        return ""
    lo, hi = vals[0], vals[-1]
    looks_cip = (hi <= CIP_MAX and any((v & 0xFF) in CIP_REGIONS for v in vals)
                 and (hi > 255 or len({v for v in vals if 9 <= v <= 14}) >= 3))
    hints: list[str] = []
    if looks_cip:
        hints.append(f"{_flag(flag, 'cip')} for a Chest Imaging Platform label map (value = "
                     "region + 256 x type; regions 9-14 are the lung thirds)")
    if len(vals) == 1:
        hints.append(f"{_flag(flag, f'lung={lo}')} if {lo} marks both lungs")
    elif len(vals) == 2:
        hints.append(f"{_flag(flag, f'right={lo},left={hi}')} if {lo} is the right lung and "
                     f"{hi} the left, or {_flag(flag, f'lung={lo}+{hi}')}")
    elif not looks_cip:
        hints.append(f"{_flag(flag, f'lung={lo}-{hi}')} if every non-zero value is lung, or "
                     f"{_flag(flag, 'right=...,left=...')} naming the values of each lung "
                     "(add background=... for other labelled structures)")
    return "Pass " + "; or ".join(hints) + "."


def _flag(flag: str, spec: str) -> str:
    return f"{flag}{spec!r}" if flag.endswith("=") else f"{flag} {spec}"


@dataclass(frozen=True)
class ResolvedLabels:
    """A label map read through a convention."""

    #: medseg's labels: 0 background, 1 right, 2 left, 3 lung of no side (uint8, or the
    #: input itself when it already is one).
    array: npt.NDArray[Any]
    #: The convention applied (``auto`` resolved to the one it chose).
    convention: LabelConvention
    #: The distinct values of the input map.
    values: tuple[int, ...]
    #: Whether right and left can be scored from this map.
    sided: bool
    notes: tuple[str, ...] = ()


def resolve_labels(arr: Any, convention: str | LabelConvention = DEFAULT_REF_LABELS, *,
                   role: str = "reference", path: str | Path | None = None,
                   flag: str = "--ref-labels") -> ResolvedLabels:
    """Check the values of the label map ``arr`` against ``convention`` and convert it to
    medseg's labels. ``role`` ("reference", "prediction"), ``path`` and ``flag`` (the option
    that sets the convention, for the message; ending in ``=`` it is shown as a Python
    argument) only word the error and the notes.

    Raises :class:`~medseg.errors.InputError` naming ``path``, the values found and what to
    pass when the map holds a value the convention does not name.
    """
    conv = LabelConvention.parse(convention)
    a = as_label_array(arr, path=path, role=role)
    values = distinct_values(a)
    notes: list[str] = []
    nonzero = [int(v) for v in values if v != 0]
    if conv.preset is Preset.AUTO:
        if set(nonzero) == {1}:
            conv = BINARY
            notes.append(f"the {role} holds only the values 0 and 1: read as {BINARY} (one "
                         f"label for both lungs); if 1 is the right lung alone, pass "
                         f"{_flag(flag, str(MEDSEG))}")
        elif set(nonzero) <= {1, 2}:
            conv = MEDSEG
        else:
            raise InputError(
                f"the {role}'s label values {_fmt_values([int(v) for v in values])} fit no "
                f"convention medseg assumes ({MEDSEG}, or {BINARY} for a 0/1 mask). "
                + _suggest(nonzero, flag), path=path)
    codes = conv.codes(values)
    bad = [int(v) for v, c in zip(values, codes, strict=True) if c < 0]
    if bad:
        raise InputError(
            f"the {role} holds label value(s) {_fmt_values(bad)} that the convention {conv} "
            f"does not name (values found: {_fmt_values([int(v) for v in values])}). "
            + _suggest(nonzero, flag), path=path)
    out = _convert(a, values, codes)
    sided = conv.sided and 3 not in codes
    if conv.preset is Preset.CIP and 3 in codes:
        notes.append(f"the {role} (a CIP label map) holds WholeLung (region 1) voxels, which "
                     "have no side")
    return ResolvedLabels(array=out, convention=conv, values=tuple(int(v) for v in values),
                          sided=sided, notes=tuple(notes))


def _convert(a: npt.NDArray[Any], values: npt.NDArray[np.int64],
             codes: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    if np.array_equal(values, codes) and a.dtype == np.uint8:
        return a  # already medseg's labels
    if values.size and values[0] >= 0 and values[-1] < _LUT_LIMIT:
        lut = np.zeros(int(values[-1]) + 1, np.uint8)
        lut[values] = codes
        return lut[a]
    return codes.astype(np.uint8)[np.searchsorted(values, a)]


# -- scoring -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelScore:
    """Metrics of a prediction against a reference, and how their labels were read."""

    #: ``{"right": {...}, "left": {...}, "lung": {...}}``, or only ``"lung"`` when one of
    #: the maps has no sides (see :func:`score_resolved`).
    metrics: dict[str, dict[str, float]]
    #: The conventions applied, canonical specs (``auto`` resolved).
    pred_labels: str
    ref_labels: str
    notes: tuple[str, ...] = ()


def score_resolved(pred: ResolvedLabels, ref: ResolvedLabels, spacing: Sequence[float], *,
                   nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                   pred_flag: str = "--pred-labels") -> LabelScore:
    """Metrics of two label maps read through their conventions (:func:`resolve_labels`):
    right, left and lung when both tell the sides apart, else ``lung`` (every lung voxel of
    each map) alone, with a note naming the map that has no sides."""
    notes = [*pred.notes, *ref.notes]
    if pred.sided and ref.sided:
        groups: Mapping[str, Sequence[int]] = LUNG_LABELS
        p_has = {v for v in (1, 2) if v in pred.values} if pred.convention == MEDSEG else None
        r_codes = set(np.unique(ref.convention.codes(np.asarray(ref.values))).tolist())
        if p_has is not None and len(p_has) == 1 and {1, 2} <= r_codes:
            missing = "left lung (label 2)" if 1 in p_has else "right lung (label 1)"
            notes.append(f"the prediction has no {missing}: if it is a one-label lung mask, "
                         f"pass {_flag(pred_flag, 'lung=' + str(min(p_has)))}")
    else:
        groups = LUNG_ONLY
        which = [f"the {role}'s ({res.convention})" for role, res in
                 (("prediction", pred), ("reference", ref)) if not res.sided]
        notes.append("scored 'lung' (both lungs together) only: "
                     + " and ".join(which) + " labels do not tell right from left")
    metrics = label_metrics(pred.array, ref.array, spacing, nsd_tolerance_mm, labels=groups)
    return LabelScore(metrics=metrics, pred_labels=str(pred.convention),
                      ref_labels=str(ref.convention), notes=tuple(notes))


def score_label_maps(pred: Any, ref: Any, spacing: Sequence[float], *,
                     pred_labels: str | LabelConvention = DEFAULT_PRED_LABELS,
                     ref_labels: str | LabelConvention = DEFAULT_REF_LABELS,
                     nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                     pred_path: str | Path | None = None, ref_path: str | Path | None = None,
                     flags: tuple[str, str] = ("pred_labels=", "ref_labels=")) -> LabelScore:
    """Check both label maps against their conventions and score them.

    ``spacing`` is in array axis order, mm (as :func:`medseg.evaluate.label_metrics`). The
    paths and ``flags`` (the options that set the conventions) only word messages. Returns a
    :class:`LabelScore`; raises :class:`~medseg.errors.InputError` when a map holds values
    its convention does not name, :class:`~medseg.errors.ConfigError` for a bad spec.
    """
    p_conv = LabelConvention.parse(pred_labels)
    r_conv = LabelConvention.parse(ref_labels)
    p = resolve_labels(pred, p_conv, role="prediction", path=pred_path, flag=flags[0])
    r = resolve_labels(ref, r_conv, role="reference", path=ref_path, flag=flags[1])
    return score_resolved(p, r, spacing, nsd_tolerance_mm=nsd_tolerance_mm,
                          pred_flag=flags[0])
