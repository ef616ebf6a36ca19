"""RetinaFace MobileNet-0.25 weights (see SOURCE.md)."""
