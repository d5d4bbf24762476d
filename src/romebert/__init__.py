"""romebert: multi-exit (early-exit) transformer classifiers, RomeBERT and DeeBERT training."""

__version__ = "0.1.0"
