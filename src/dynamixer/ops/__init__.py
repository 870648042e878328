"""Low-level operations of the fast path (kernels and the dispatch between them)."""
