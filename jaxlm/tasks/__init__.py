"""Task data, metrics and the evaluation driver for the families' applications."""
