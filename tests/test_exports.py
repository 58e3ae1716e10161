"""Every public name is exported, and every exported name exists."""

from __future__ import annotations

import inspect

import medseg
import medseg.errors


def test_all_is_complete_and_valid() -> None:
    for name in medseg.__all__:
        assert hasattr(medseg, name), name
    public_errors = {
        n for n, obj in vars(medseg.errors).items()
        if inspect.isclass(obj) and issubclass(obj, medseg.errors.MedsegError)
    }
    assert public_errors <= set(medseg.__all__)
    assert public_errors == set(medseg.errors.__all__)


def test_error_message_carries_context() -> None:
    err = medseg.errors.MissingSlicesError("2 slice(s) missing", path="/data/x", series="1.2.3")
    assert str(err) == "/data/x: series 1.2.3: 2 slice(s) missing"
    assert isinstance(err, medseg.errors.GeometryError)
    assert isinstance(err, medseg.errors.InputError)
