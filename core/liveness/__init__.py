"""Presentation attack detection: silent cues and an interactive challenge."""
