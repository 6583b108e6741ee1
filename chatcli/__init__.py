"""chatcli: a command-line chat suite — a fast WebSocket relay and send/listen/chat clients."""

__version__ = "0.1.0"
