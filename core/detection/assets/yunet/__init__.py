"""YuNet's ONNX file, licence and source (a package so the file ships)."""
