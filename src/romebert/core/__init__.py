"""Shared ground that every layer stands on: the one error type (``errors``), options declared on
dataclasses (``options``), atomic files and JSON (``files``), devices (``devices``), the machine and
versions a figure was measured on (``environment``), the layout of a run folder (``runs``) and a progress
line for long jobs (``progress``).

May import: nothing.
"""
