"""The paper's workloads, apart from the library: models, datamodules, the demo, the evaluation, class specificity.

The library never imports this package. Its hyperparameters live in ``configs/*.yaml``
(:mod:`~lightning_tracetrain.workloads.config` reads them for code that trains outside LightningCLI).
"""
