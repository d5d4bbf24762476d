"""Shared ground that every layer stands on: the one error type (``errors``), options declared on
dataclasses (``options``), atomic files and JSON (``files``), devices (``devices``), the machine and
versions a figure was measured on (``environment``) and the layout of a run folder (``runs``).

May import: nothing.
"""
