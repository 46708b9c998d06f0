"""Output: incremental detokenization, stop strings and token ids, finish reasons."""
