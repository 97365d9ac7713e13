"""Evaluation: metrics, judges and the harness that scores any system."""
