"""The functional core of the gradient-based methods: parameters as dicts, ``torch.func`` inner
loops, meta-gradients for a batch of tasks (see :mod:`metalab.functional.inner`)."""

from metalab.functional.inner import (
    BACKENDS,
    LossFn,
    MetaGradient,
    Params,
    adapt,
    classification_loss,
    meta_gradient,
    regression_loss,
    write_grads,
)

__all__ = [
    "BACKENDS",
    "LossFn",
    "MetaGradient",
    "Params",
    "adapt",
    "classification_loss",
    "meta_gradient",
    "regression_loss",
    "write_grads",
]
