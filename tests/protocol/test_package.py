"""chatcli.protocol as a package: one public surface re-exported from its modules, legacy loaded on first use."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from chatcli import protocol as p
from chatcli.protocol import _values, legacy, v1


def test_the_package_exports_what_its_modules_export() -> None:
    assert sorted(p.__all__) == sorted([*_values.__all__, *v1.__all__, *legacy.__all__])
    for name in p.__all__:
        assert getattr(p, name) is getattr(_values if name in _values.__all__ else
                                           v1 if name in v1.__all__ else legacy, name)


def test_importing_the_package_leaves_legacy_unloaded() -> None:
    """Client commands import the package on start-up and never speak the seed's protocol."""
    check = ("import sys, chatcli.protocol as p; assert 'chatcli.protocol.legacy' not in sys.modules; "
             "p.LEGACY_CONNECTED; assert 'chatcli.protocol.legacy' in sys.modules")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=30)


def test_legacy_names_stay_in_the_package_once_loaded() -> None:
    """After the first use the server's per-message look-ups are plain attributes, not ``__getattr__`` calls."""
    assert p.LEGACY_SEND_SUCCESS == "send:success"
    assert {name: vars(p)[name] for name in legacy.__all__} == {name: getattr(legacy, name) for name in legacy.__all__}


def test_an_unknown_name_is_an_attribute_error() -> None:
    message = "module 'chatcli.protocol' has no attribute 'encode_legacy_send'"
    with pytest.raises(AttributeError, match=re.escape(message)):
        p.encode_legacy_send  # noqa: B018  (moved to tests/support/flutter_app.py)
    assert not hasattr(p, "decode_legacy_message")
