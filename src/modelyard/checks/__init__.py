"""Validation gates: data expectations, model metrics and champion/challenger, behaviour tests."""
