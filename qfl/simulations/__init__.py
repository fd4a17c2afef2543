"""Flower apps, data, models, experiment runner and report for qfl."""
