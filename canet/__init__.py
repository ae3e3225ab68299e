"""canet: CANet ("One Person, One Model") with per-user sub-networks that really save compute.

Importing canet never touches CUDA and never needs the compiled extension or triton.
"""

from ._version import __version__
from .flops import flops, flops_router
from .model import CANet
from .space import Config, RoutingSpace

__all__ = ["__version__", "CANet", "Config", "RoutingSpace", "flops", "flops_router"]
