"""The inference-speed harness: paths (what is timed), timing, result rows. ``inference_speed.py`` is its
command line; ``tests/test_benchmarks.py`` runs it on a tiny model."""
