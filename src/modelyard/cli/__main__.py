"""`python -m modelyard.cli …`: the same command as the `modelyard` script."""

from modelyard.cli import app

app()
