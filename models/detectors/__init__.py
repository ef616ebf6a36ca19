"""Face detectors whose networks are defined here in PyTorch (RetinaFace, MTCNN)."""
