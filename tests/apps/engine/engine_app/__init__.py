"""Compressed strategies vs plain Flower in the simulation engine (tests/test_engine.py)."""
