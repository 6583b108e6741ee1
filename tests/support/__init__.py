"""What test modules share, in one place (fixtures stay in ``tests/conftest.py``):

- ``processes``: real ``chatcli serve`` and ``chatcli`` processes, ``wait_until``, ``metric``, and the
  fixture types ``StartServer`` and ``Chatcli``;
- ``wsclients``: WebSocket clients (native chatcli.v1, the seed Flutter app's connection, a raw socket);
- ``flutter_app``: what the seed Flutter app writes and reads;
- ``credentials``: accounts (``add_user``) and TLS certificates and servers;
- ``samples``: shared sample values (a timestamp, a store epoch, ``NASTY_TEXTS``).

The server's in-process fakes stay beside their only users, in ``tests/server/fakes.py``.
"""
