"""Feedback: the ingester (feedback topic -> join with the request log -> buffer), its client and HTTP endpoint.

Modules: :mod:`feedback.join` (pure decisions), :mod:`feedback.ingester`, :mod:`feedback.client`,
:mod:`feedback.http`, :mod:`feedback.cli` (``loraloop feedback run|send``).
"""
