"""Built-in example models for demos and tests (no downloads)."""
