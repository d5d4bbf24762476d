"""What the command line runs: training and evaluating a run (``pipeline``), predicting files
(``predict``) and comparing methods (``compare``).

May import: core, data, runtime, model, training, evaluation, deploy.
"""
