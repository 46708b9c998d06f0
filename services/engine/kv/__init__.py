"""KV memory: the refcounted block pool, the paged KV tensors, and the prefix caches (the
radix tree, or the null cache when radix caching is off) behind one interface."""
