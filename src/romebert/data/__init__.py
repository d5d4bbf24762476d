"""Examples and what they are measured by: the GLUE task table (``tasks``), GLUE readers (``glue``), the
user's own CSV / TSV / JSON Lines files (``custom``), rows and labels (``examples``), where a run's data
comes from (``spec.DataSpec``) and the task metrics (``metrics``). Torch-free.

May import: core.
"""
