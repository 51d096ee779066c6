"""The method's math as plain functions over tensors: no Lightning, no I/O.

One module per concept of the paper (docs/method.md derives each formula):

- :mod:`~lightning_tracetrain.functional.delta`: a step's weight change ``D_t`` and the sums it forms;
- :mod:`~lightning_tracetrain.functional.lowrank`: a step stored as a rank-r product ``P_t Q_t^T``;
- :mod:`~lightning_tracetrain.functional.gamma`: a step's share of a pre-activation (eq. 6, 7);
- :mod:`~lightning_tracetrain.functional.norms`: contribution norms ``||H D_t^T + d_t||``;
- :mod:`~lightning_tracetrain.functional.ghost`: ghost-sample batch norm (Algorithm 2, corrected);
- :mod:`~lightning_tracetrain.functional.attribution`: examples and classes (Algorithms 1, 3).

The recorder, the trace reader, the explainer and the batch norm layers call
these functions; the tests compare them with slow references.
"""

from lightning_tracetrain.functional.attribution import (
    example_scores,
    predicted_class_share,
    step_class_shares,
    weighted_kde,
)
from lightning_tracetrain.functional.delta import (
    accumulate,
    factored_deltas,
    factored_sum,
    padded_steps,
    row_steps,
    weight_deltas,
)
from lightning_tracetrain.functional.gamma import (
    cosines,
    layer_output,
    query_gradient,
    row_gammas,
    step_gammas,
    step_sums,
)
from lightning_tracetrain.functional.ghost import ghost_moments, real_cross_entropy
from lightning_tracetrain.functional.lowrank import (
    lowrank_deltas,
    lowrank_gammas,
    lowrank_pays,
    lowrank_row_gammas,
    lowrank_sum,
    matrix_shape,
    power_step,
    row_form_pays,
)
from lightning_tracetrain.functional.norms import contribution_norms, factored_norms, gram_norms, input_rows

__all__ = [
    "accumulate",
    "contribution_norms",
    "cosines",
    "example_scores",
    "factored_deltas",
    "factored_norms",
    "factored_sum",
    "ghost_moments",
    "gram_norms",
    "input_rows",
    "layer_output",
    "lowrank_deltas",
    "lowrank_gammas",
    "lowrank_pays",
    "lowrank_row_gammas",
    "lowrank_sum",
    "matrix_shape",
    "padded_steps",
    "power_step",
    "predicted_class_share",
    "query_gradient",
    "real_cross_entropy",
    "row_form_pays",
    "row_gammas",
    "row_steps",
    "step_class_shares",
    "step_gammas",
    "step_sums",
    "weight_deltas",
    "weighted_kde",
]
