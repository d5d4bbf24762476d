"""The PyTorch multi-exit model: ``modeling.MultiExitModel`` (an exit after every layer), one adapter per
encoder family (``encoders``), the model as the engine's segments (``segments``) and loading tokenizers
and trained runs (``loading``).

May import: core, data, runtime.
"""
