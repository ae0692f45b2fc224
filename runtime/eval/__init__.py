"""Evaluation harness: python -m runtime.eval."""
