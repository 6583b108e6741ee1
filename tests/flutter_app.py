"""Kept for ``benchmarks/memory_bench.py``, which imports the Flutter app's send frame from here.

Tests import ``tests.support.flutter_app``; this module only re-exports it.
"""

from tests.support.flutter_app import decode_legacy_message, encode_legacy_send

__all__ = ["decode_legacy_message", "encode_legacy_send"]
