"""KV memory: the refcounted block pool, the paged KV tensors (and the fp8 numerics of an fp8
cache, `fp8.py`), and the prefix caches (the radix tree, or the null cache when radix caching
is off) behind one interface."""
