"""Compression: structured and unstructured pruning, recovery fine-tuning, and quantization of exports."""
