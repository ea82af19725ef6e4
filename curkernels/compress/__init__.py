"""Compression methods behind `compress()`."""

from .api import METHODS, compress
from .budget import factor_parameters, rank_for_keep
from .report import CompressionReport, ModuleReport

__all__ = ["METHODS", "CompressionReport", "ModuleReport", "compress", "factor_parameters",
           "rank_for_keep"]
