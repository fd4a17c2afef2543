"""quickstart-pytorch, compressed by qfl."""
