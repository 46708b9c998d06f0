"""KV memory: the refcounted block pool, the paged KV tensors, the radix prefix cache."""
