"""The related methods, computed on the same trained model, for comparison: Representer Points, TracIn, ClaDec.

They depend on the batch protocol and the trace only, so they work for any model that follows it.
"""

from lightning_tracetrain.baselines.cladec import ClaDec, fit_decoders
from lightning_tracetrain.baselines.representer import RepresenterPoints
from lightning_tracetrain.baselines.tracin import TracIn

__all__ = ["ClaDec", "RepresenterPoints", "TracIn", "fit_decoders"]
