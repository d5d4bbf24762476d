"""Measuring a trained model: every exit's logits in one pass (``logits``), per-exit metrics, sweeps and
threshold choice from those logits (``exits``), per-exit temperatures (``calibration``), result files
(``reports``, ``evaluate``) and plots (``plots``).

May import: core, data, runtime, model.
"""
