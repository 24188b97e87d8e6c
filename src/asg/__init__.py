"""ASG: automated synthetic-to-real generalization."""

__version__ = "0.1.0"
