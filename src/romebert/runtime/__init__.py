"""Early-exit inference without torch: tokenizing and padding (``encoding``), the exit criteria
(``policies``), the layer-by-layer engine (``engine``), ONNX Runtime segments (``onnx_runtime``) and
what a deployed classifier carries besides its weights (``artefacts``). ``pip install romebert[runtime]``
is enough for all of it.

May import: core, data.
"""
