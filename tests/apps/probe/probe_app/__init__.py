"""Probe Flower App for the qfl launcher tests."""
