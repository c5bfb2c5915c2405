"""Training: frozen-trunk feature extraction with an on-disk cache, and head/tail training."""
