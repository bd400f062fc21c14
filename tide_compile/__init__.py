"""tide-compile: token-level early exit for HuggingFace causal LMs.

Public API: :class:`TIDEConfig`, :class:`TokenRouter`, :class:`RouterSet`,
:class:`ExitStats`. Everything else is importable from its module but not exported.
"""

from .config import TIDEConfig
from .routers import ExitProjection, RouterSet, TokenRouter
from .stats import ExitStats

__version__ = "0.3.0.dev0"

__all__ = ["TIDEConfig", "TokenRouter", "ExitProjection", "RouterSet", "ExitStats", "__version__"]
