"""tide-compile: token-level early exit for HuggingFace causal LMs.

Public API: :func:`calibrate`, :class:`TIDEConfig`, :class:`TokenRouter`,
:class:`RouterSet`, :class:`ExitStats`, :func:`optimize`, :func:`attach`, :class:`TIDEError`
(the error bad input raises, a ``ValueError``). Everything else is importable from its module but not exported.
"""

from .calibration import calibrate
from .config import TIDEConfig
from .routers import ExitProjection, RouterSet, TokenRouter
from .stats import ExitStats
from .backend import attach, detach  # registers the "tide" torch.compile backend
from .runtime.model import TIDEModel, optimize
from .validation import TIDEError

__version__ = "0.3.0.dev0"

__all__ = [
    "calibrate",
    "optimize",
    "attach",
    "detach",
    "TIDEConfig",
    "TokenRouter",
    "ExitProjection",
    "RouterSet",
    "ExitStats",
    "TIDEModel",
    "TIDEError",
    "__version__",
]
