"""PyTorch networks, their weights, margin heads, ONNX export and the model registry."""
