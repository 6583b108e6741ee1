"""The chatcli clients, one module per concern; ``chatcli.cli`` holds their Typer commands.

* ``settings``  — client settings and profiles: flag > environment > profile > default
* ``session``   — one chatcli.v1 session: connect, handshake, requests, error translation
                  (the only client module that imports websockets)
* ``wire``, ``oneshot`` — a one-message ``send`` and ``history`` on a blocking socket: RFC 6455 client
                  framing in the standard library, no asyncio or websockets to import
* ``connecting`` — what both transports share: user URLs, TLS settings, client ids, failure wording
* ``reconnect`` — backoff, resume points and message cursors (with the store's epoch), the cursor file
* ``inputs``    — what commands read from arguments and stdin (``--since``, the texts to send)
* ``commands``  — the transport halves of ``send``, ``listen``, ``history`` and ``who``
* ``render``    — JSON lines, chat lines and the status line (the only Rich importer)
* ``repl``      — the ``chat`` REPL (the only prompt_toolkit importer)

Nothing is imported here, so ``chatcli send`` loads only the modules it uses.
"""

__all__: list[str] = []
