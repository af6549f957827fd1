"""Fault toolkit for tests, tools/soak and benchmarks: a userspace link proxy that shapes and
breaks TCP connections (`proxy`), and a faulty disk made of nbdkit's error and delay filters
exposed as a file with nbdfuse (`disk`). Nothing in the product imports this package."""
