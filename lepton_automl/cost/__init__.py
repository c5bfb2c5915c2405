"""Cost: latency measured on the real exported artifact, and hardware price profiles."""
