"""How much the Hypothesis state machines explore: ``EVS_SOAK=N`` multiplies it.

The default run keeps a few examples of each machine (the whole suite stays
within minutes); ``make soak`` runs them with ``EVS_SOAK=20`` and random
seeds (``HYPOTHESIS_PROFILE=dev``).
"""

from __future__ import annotations

import os


def examples(default: int) -> int:
    """``default`` examples, times ``EVS_SOAK`` (a positive integer) when it is set."""
    text = os.environ.get("EVS_SOAK", "1")
    try:
        scale = int(text)
    except ValueError:
        raise ValueError(f"EVS_SOAK must be a positive integer, not {text!r}") from None
    if scale < 1:
        raise ValueError(f"EVS_SOAK must be a positive integer, not {text!r}")
    return default * scale
