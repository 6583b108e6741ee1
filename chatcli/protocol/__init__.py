"""The chatcli wire protocols (for now all in ``v1``; the next commit splits them by concern)."""

from chatcli.protocol.v1 import *  # noqa: F403
