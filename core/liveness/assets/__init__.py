"""MiniFASNet ONNX files shipped with facefed (see README.md in this folder)."""
