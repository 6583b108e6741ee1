"""Engines: where messages, cursors, presence and accounts live, behind one seam.

The relay talks to an ``Engine`` (``base.py``) and to nothing else for storage,
routing beyond this process, presence and accounts:

* ``base.py``      the seam: the ``Engine`` protocol, its records, ``Capability``, ``EngineListener``
* ``memory.py``    ``--ephemeral``: ids in process memory, nothing stored, offline recipients refused
* ``sqlite.py``    the default: one SQLite file (``chatcli.server.storage``, ``chatcli.server.accounts``),
                   every call on the storage thread
* ``pages.py``     backlog pages and history answers, bounded in count and bytes (shared by engines)
* ``options.py``   ``Fsync``: the engine choices the CLI offers (import-free, for start-up time)

This package imports nothing here, so ``chatcli.server.engine.options`` stays cheap to import.
"""

__all__: list[str] = []
