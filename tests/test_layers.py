"""The package's layering, checked on the source (an AST walk, no imports):

* no module imports a ``_private`` name or module of another subpackage (the root
  package's own ``medseg._version``, ``medseg._alloc``, ``medseg._lazy`` and
  ``medseg._monai`` are shared by all);
* ``medseg.io`` imports nothing above it: only itself, ``medseg.errors``,
  ``medseg.volume``, ``medseg.conventions`` and ``medseg._version``
  (ARCHITECTURE.md: "IO receives what it writes");
* ``medseg.batch`` never imports ``medseg.pacs`` (ARCHITECTURE.md: "pacs and node depend on
  batch's public API; batch never imports them").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "medseg"
#: Modules ``medseg.io`` may import: the layer's base.
IO_MAY_IMPORT = ("medseg.io", "medseg.errors", "medseg.volume", "medseg.conventions",
                 "medseg._version", "medseg._lazy")
#: Subpackages a subpackage must never import (ARCHITECTURE.md).
FORBIDDEN = {"batch": ("pacs", "node")}
#: Private modules of the root package, shared by every subpackage.
ROOT_PRIVATE = ("medseg._version", "medseg._alloc", "medseg._lazy", "medseg._monai")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(module: str, source: str) -> list[str]:
    """The layering rules broken by ``source``, the text of ``module``."""
    found = []
    here = _subpackage(module)
    for node in ast.walk(ast.parse(source)):
        targets: list[tuple[str, list[str]]] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            targets.extend((a.name, []) for a in node.names)
        for target, names in targets:
            if not (target == "medseg" or target.startswith("medseg.")):
                continue
            other = _subpackage(target) != here
            private_mod = any(p.startswith("_") for p in target.split(".")[1:])
            if other and private_mod and not target.startswith(ROOT_PRIVATE):
                found.append(f"{module} imports the private module {target}")
            for name in names:
                full = f"{target}.{name}"
                if other and name.startswith("_") and not name.startswith("__") \
                        and not full.startswith(ROOT_PRIVATE) \
                        and not target.startswith(ROOT_PRIVATE):
                    found.append(f"{module} imports the private name {target}.{name}")
            if here == "io" and not target.startswith(IO_MAY_IMPORT):
                found.append(f"{module} (the IO layer) imports {target}, a layer above it")
            if _subpackage(target) in FORBIDDEN.get(here, ()):
                found.append(f"{module} imports {target}: {here} must not depend on "
                             f"{_subpackage(target)}")
    return found


def test_the_package_keeps_its_layers() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found.extend(violations(_module_name(path), path.read_text(encoding="utf-8")))
    assert found == []


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("medseg.batch.sources", "from medseg.io.dicom import _looks_like_dicom\n",
     "private name medseg.io.dicom._looks_like_dicom"),
    ("medseg.segment", "from medseg.io._atomic import output_unit\n",
     "private module medseg.io._atomic"),
    ("medseg.io.dicom_sr", "from medseg.quantify import quantify\n",
     "the IO layer) imports medseg.quantify"),
    ("medseg.io.dicom_sr", "def f():\n    import medseg.segment\n",
     "the IO layer) imports medseg.segment"),
    ("medseg.batch.runner", "def f():\n    from medseg.pacs.batch import make_job\n",
     "batch must not depend on pacs"),
])
def test_the_check_finds_what_it_forbids(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert len(found) == 1 and expected in found[0]


def test_the_check_allows_what_is_allowed() -> None:
    assert violations("medseg.io.dicom", "from medseg.io.atomic import atomic_output\n"
                      "from medseg._version import __version__\n"
                      "from medseg.io._x import _y\n") == []
    assert violations("medseg.pacs.batch", "from medseg.batch.sources import unique_ids\n") \
        == []
