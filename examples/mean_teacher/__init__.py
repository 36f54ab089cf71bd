"""Mean-teacher training on Ignite engines: the trainer factory, and a demo on scikit-learn's digits."""

from examples.mean_teacher.trainer import (
    MeanTeacherBatch,
    create_mean_teacher_trainer,
    select_items,
    sigmoid_mse,
    sigmoid_rampup,
    softmax_mse,
)

__all__ = [
    "MeanTeacherBatch",
    "create_mean_teacher_trainer",
    "select_items",
    "sigmoid_mse",
    "sigmoid_rampup",
    "softmax_mse",
]
