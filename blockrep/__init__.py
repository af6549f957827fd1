"""blockrep: a userspace block-level replication engine with an NBD frontend."""

import os as _os

__version__ = "0.1.0"

# numpy (bitmaps, histograms) never calls BLAS here: no idle OpenBLAS threads beside the
# event loop (set before anything imports numpy; a user's own setting is kept)
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
