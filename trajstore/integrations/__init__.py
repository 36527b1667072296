"""Trainer callbacks (optional extras): ``trajstore.integrations.lightning`` and ``.transformers``."""
