"""Federated fine-tuning: the Flower server app, run management and model versions."""
