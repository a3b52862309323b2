"""Conversion between this system's checkpoints and Hugging Face transformers models."""
