"""Hypothesis runs derandomized (for the whole run, once this conftest is loaded): CI holds the protocol
package at 100% branch coverage, and no branch may be covered only by the luck of one run's random examples."""

from hypothesis import settings

settings.register_profile("protocol-derandomized", derandomize=True)
settings.load_profile("protocol-derandomized")
