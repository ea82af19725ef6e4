"""Compression methods behind `compress()`, their calibration and healing."""

from .api import METHODS, compress
from .budget import factor_parameters, rank_for_keep
from .calibration import LinearStats, collect_linear_stats, first_order_importance
from .calibration_sources import as_batches, calibration_texts
from .configs import *  # noqa: F403 (the config classes: configs.__all__)
from .configs import CONFIGS
from .configs import __all__ as _CONFIG_CLASSES
from .deim import deim_select, greedy_select, qdeim_select
from .healing import heal
from .layer_selection import angular_layer_scores, select_layers
from .report import CompressionReport, ModuleReport
from .rom import ROM_PRESETS

__all__ = [*_CONFIG_CLASSES, "CONFIGS", "CompressionReport", "LinearStats", "METHODS",
           "ModuleReport", "ROM_PRESETS", "angular_layer_scores", "as_batches",
           "calibration_texts", "collect_linear_stats", "compress", "deim_select",
           "factor_parameters", "first_order_importance", "greedy_select", "heal", "qdeim_select",
           "rank_for_keep", "select_layers"]
