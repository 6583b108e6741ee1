"""How many connections the server admits under a file-descriptor limit (the arithmetic; the end-to-end
cases, with a real limit on a real server, are in test_http_port.py)."""

from __future__ import annotations

import pytest

from chatcli.server.fdlimit import fit_connections


@pytest.mark.parametrize(("requested", "capacity", "refusing", "admitted"), [
    (100, 1000, 256, 100),        # room for it and for the polite refusals: as asked
    (20000, 19689, 256, 19433),   # this machine's default start (limit 20,000): the refusals keep their room
    (20000, 700, 256, 613),       # a low limit: an eighth of the room kept for refusals, not 256
    (20000, 0, 256, 1),           # no room by the estimate (its reserve is generous): one, and a warning
    (10, 12, 256, 10),            # asked for less than the room: never raised
])
def test_admitted_connections_fit_in_the_room(requested: int, capacity: int, refusing: int, admitted: int) -> None:
    assert fit_connections(requested, capacity, refusing) == admitted
