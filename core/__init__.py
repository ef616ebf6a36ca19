"""Inference-only face pipeline: decode, detect, align, quality, liveness, embed."""
