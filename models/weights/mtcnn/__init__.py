"""MTCNN P-Net, R-Net and O-Net weights (see SOURCE.md)."""
