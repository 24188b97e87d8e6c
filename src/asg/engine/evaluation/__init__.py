"""Evaluation during training, its metrics and selections, the end-of-run report."""
