"""Using a trained model: classify.py (classify), the CPU inference engines (engines), ONNX export and its checks
(export, batchnorm_folding), plain weight files (export_weights) and torch.hub's helpers (hub_utils)."""
