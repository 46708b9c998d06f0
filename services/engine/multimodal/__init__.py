"""Image inputs of vision-language models: spans, the prefix-cache key, the image encoder."""
