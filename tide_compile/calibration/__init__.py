"""Eager calibration: text -> hidden states -> labels -> routers -> quality table.

``data`` loads and packs text, ``collect`` reads checkpoint states with forward hooks,
``labels`` decides which tokens are done, ``train`` fits routers and exit projections,
``quality`` measures thresholds on held-out tokens, ``pipeline`` ties them together.
"""

from .pipeline import calibrate

__all__ = ["calibrate"]
