"""``chatcli serve``: the relay server, one module per layer, outermost first.

* ``main``          start-up, listeners, signals, graceful shutdown, /healthz and /metrics routes
* ``transport``     websockets' sans-I/O protocol in an ``asyncio.Protocol``: framing, writes batched once per
                    tick, backpressure, frame budgets; nothing is acted on before admission
* ``admission``     who may open a session: a pure function from the request to ``Admitted`` or ``Refused``
* ``throttle``      failed authentications per address; ``limitlog``: one log line per limit per interval
* ``codecs``        one codec per wire protocol (chatcli.v1, the seed's frames), picked at the handshake
* ``relay``         sessions, routing, replay, history, presence and per-user limits; transport-free
* ``engine``        the seam behind which messages, cursors, presence and accounts live (memory, SQLite)
* ``storage``, ``accounts``, ``storage_thread``   the SQLite file format, and the thread that runs it
* ``http_api``, ``metrics``   the HTTP side port and the counters it exposes
* ``config``, ``fdlimit``     settings checked at start-up; the file-descriptor limit and its capacity

Nothing is imported here: ``chatcli`` client commands never load the server.
"""

__all__: list[str] = []
