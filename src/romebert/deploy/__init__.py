"""Putting a model to work: the classifier users call (``classifier.EarlyExitClassifier``), the ONNX
export (``export``, ``export_graphs``), continuous batching (``serving``), the HTTP service
(``service``; its routes ``app``, admission ``admission``, contract ``openapi``, metrics ``metrics``,
memory ``memory``) and the accuracy guard (``guard``). Loading an export and serving it need no torch.

May import: core, data, runtime, model, evaluation.
"""
