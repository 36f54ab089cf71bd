"""The README's usage as a user's strictly typed script: ``mypy --strict`` checks it in ``tox -e type``.

Not collected by pytest (no ``test_`` prefix); the README's own block runs in the tests and in ``tox -e wheel``.
"""

from __future__ import annotations

import torch

from ignite_ema import EMAHandler, ModelEMA

model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
ema = ModelEMA(model)
teacher = ema.ema_model  # a module, not Optional: callable as it is
prediction: torch.Tensor = teacher(torch.randn(2, 4))
handler = EMAHandler(model, momentum=0.01)
handler_teacher = handler.ema_model
handler_prediction: torch.Tensor = handler_teacher(torch.randn(2, 4))
