"""blockrep: a userspace block-level replication engine with an NBD frontend."""

__version__ = "0.1.0"
