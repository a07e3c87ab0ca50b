"""The embedded demo of SemLA: a small procedural street world under eight weather x time-of-day
conditions (``semla_demo.world``), written in the MUSES layout so the project's own tools read it.

Importing this package imports nothing heavy; use ``from semla_demo.world import write_world, ...``.
"""
