"""Putting a model to work: the classifier users call (``classifier.EarlyExitClassifier``), the ONNX
export (``export``, ``export_graphs``), continuous batching (``serving``) and the HTTP service
(``service``). Loading an export and serving it need no torch.

May import: core, data, runtime, model, evaluation.
"""
