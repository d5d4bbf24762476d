"""What the command line runs: training and evaluating a run (``pipeline``), predicting files
(``predict``), on Ray Data beyond one machine (``distributed_predict``) and comparing methods
(``compare``).

May import: core, data, runtime, model, training, evaluation, deploy.
"""
