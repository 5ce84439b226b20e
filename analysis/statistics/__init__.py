"""The statistics of the outlier analysis, one module each, chosen by name from one registry.

Each is a `base.Statistic`: it names the capture sites it reads (analysis.capture.SITES), accumulates each
batch with `update(capture, batch)` and gives its part of outliers.json with `result(results)`; its report
sections, figures, schema and thresholds live with it. analysis.analyzer.OutlierAnalyzer runs them in the
order of the registry, which is their order in outliers.json and in report.md. A new statistic is a module
here and its line below.
"""

from analysis.statistics.activation import Activation
from analysis.statistics.attention import Attention
from analysis.statistics.consistency import Consistency
from analysis.statistics.lifecycle import Lifecycle
from analysis.statistics.normalization import Normalization
from analysis.statistics.weight_link import WeightLink
from analysis.statistics.weights import Weights
from runtime.cli import add_to_registry

REGISTRY = {s.name: s for s in (Activation, Weights, WeightLink, Attention, Consistency, Lifecycle, Normalization)}


def register(statistic):
    """Add a statistic class (e.g. from a research script): analyses then run it, after the others."""
    return add_to_registry(REGISTRY, statistic, "statistic")
