"""Large models (ResNet-18, a GPT-2-small-shaped decoder) and many small clients, compressed by qfl."""
