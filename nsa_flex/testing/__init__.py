"""Checking tools for users as much as for us: float64 dense references, ``assert_matches_dense`` and
Hypothesis strategies (``nsa_flex.testing.strategies``, needs the ``test`` extra), ``nsa_inputs`` (random or
structured NSA inputs)."""

from .assertions import GRADIENT_TOLERANCE, TOLERANCE, assert_matches_dense
from .inputs import nsa_inputs
from .nsa_reference import reference_mean_pool, reference_nsa, reference_select_blocks
from .reference import dense_attention

__all__ = [
    "GRADIENT_TOLERANCE",
    "TOLERANCE",
    "assert_matches_dense",
    "dense_attention",
    "nsa_inputs",
    "reference_mean_pool",
    "reference_nsa",
    "reference_select_blocks",
    "strategies",
]


def __getattr__(name):
    # Hypothesis is a test-time dependency: import the strategies only when asked for.
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
