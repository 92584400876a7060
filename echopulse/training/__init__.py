"""Train/eval steps over dict batches; no Ray or DDP in here (the jobs wrap the model)."""

from echopulse.training.steps import (
    generator_eval_step,
    generator_train_step,
    lr_at,
    make_optimizer,
    tokenizer_eval_step,
    tokenizer_train_step,
    tokenizer_val_step,
)
from echopulse.training.ema import EMA

__all__ = [
    "EMA",
    "generator_eval_step",
    "generator_train_step",
    "lr_at",
    "make_optimizer",
    "tokenizer_eval_step",
    "tokenizer_train_step",
    "tokenizer_val_step",
]
