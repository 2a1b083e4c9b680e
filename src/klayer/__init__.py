"""klayer: k-layer fully-connected networks with batch normalization, from scratch in NumPy."""

from klayer.core.config import NetConfig
from klayer.core.gradcheck import check_gradients, make_check_problem, rel_error
from klayer.core.network import Metrics, Network

__version__ = "0.1.0"

__all__ = [
    "Metrics",
    "NetConfig",
    "Network",
    "__version__",
    "check_gradients",
    "make_check_problem",
    "rel_error",
]
