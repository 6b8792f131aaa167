"""loraloop: shared contracts (settings, schemas, transport, buffer, registry, metrics, CLI).

This package is imported by ``services``, ``learner`` and ``feedback`` and imports none of them.
"""

__version__ = "0.1.0"
