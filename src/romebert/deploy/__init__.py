"""Putting a model to work: the classifier users call (``classifier.EarlyExitClassifier``), the ONNX
export (``export``, ``export_graphs``; its int8 recipes ``quantize``, whose quantizer ``quantizer_logging``
keeps quiet), continuous batching (``serving``), the HTTP service (``service``; its routes ``app``,
admission ``admission``, contract ``openapi``, metrics ``metrics``, memory ``memory``), the accuracy guard
(``guard``) and scoring a user's file chunk by chunk (``file_scoring``, ``predict_file``). Loading an
export, serving it and scoring a file with it need no torch.

May import: core, data, runtime, model, evaluation.
"""
