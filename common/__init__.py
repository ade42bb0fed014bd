"""privdistill: federated, differentially private knowledge distillation for language models."""
"""Shared by both sides: data, models, privacy, CLI."""
