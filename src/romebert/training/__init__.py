"""Training a multi-exit model: the options (``training_args``), the methods as data (``methods``), pure
loss functions (``losses``), gradient projection (``projection``), batch samplers (``batching``),
checkpoints (``checkpoint``), data parallelism (``distributed``) and the loop (``trainer``).

May import: core, data, runtime, model.
"""
