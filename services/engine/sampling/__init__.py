"""Sampling: logits to token ids (penalties, top-k/p, min-p, seeds, xgrammar bitmasks)."""
