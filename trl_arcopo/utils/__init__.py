"""Small helpers shared by the trainer, the examples and the CLI."""
