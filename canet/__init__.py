"""canet: CANet ("One Person, One Model") with per-user sub-networks that really save compute.

Importing canet never touches CUDA and never needs the compiled extension or triton.
"""

from ._version import __version__
from .engine import Engine
from .flops import flops, flops_router
from .model import CANet
from .space import Config, RoutingSpace

__all__ = [
    "__version__",
    "CANet",
    "Config",
    "Engine",
    "Recommender",
    "RoutingSpace",
    "flops",
    "flops_router",
]


def __getattr__(name: str):
    # The serving front-end pulls in safetensors/yaml; load it only when asked for.
    if name == "Recommender":
        from .recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'canet' has no attribute {name!r}")
