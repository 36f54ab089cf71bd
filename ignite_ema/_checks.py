"""Argument checks shared by the public classes: each says what was expected and what was found.

Numbers are accepted by kind, not by Python type: any real number (numpy's
included) where a real is expected and any integral one where a count is,
but never a bool.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "check_bool",
    "check_count",
    "check_device",
    "check_fraction",
    "check_keys",
    "check_real",
    "check_same_shapes",
    "warn_at_caller",
    "warn_if_decay",
]


def check_real(name: str, value: object) -> float:
    """``value`` as a finite float, or a ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; found {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite; found {result}")
    return result


def check_fraction(name: str, value: object, *, low_open: bool, high_open: bool) -> float:
    """``value`` as a float in (0, 1), [0, 1], ... as the flags say."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; found {type(value).__name__} {value!r}")
    result = float(value)
    low_ok = result > 0 if low_open else result >= 0
    high_ok = result < 1 if high_open else result <= 1
    if not (low_ok and high_ok):  # NaN fails both
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"Invalid {name}: expected a value in {interval}, found {result}")
    return result


def check_count(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; found {type(value).__name__} {value!r}")
    result = int(value)
    if result < minimum:
        raise ValueError(f"{name} must be at least {minimum}; found {result}")
    return result


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; found {type(value).__name__} {value!r}")
    return bool(value)


def check_device(value: object) -> torch.device | None:
    """``None``, or a device that can hold an EMA (not ``"meta"``, which holds no values)."""
    if value is None:
        return None
    if not isinstance(value, (str, int, torch.device)) or isinstance(value, bool):
        raise TypeError(
            f"device must be a torch.device, a string like 'cuda:0' or 'cpu', or None; "
            f"found {type(value).__name__} {value!r}"
        )
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise ValueError(f"device {value!r} is not a device torch knows: {error}") from None
    if device.type == "meta":
        raise ValueError("device='meta' holds no values, so an EMA cannot live there; pass a real device or None")
    if device.type != "cpu":
        try:  # torch's own answer for a device this build or machine lacks is a bare AssertionError or RuntimeError
            torch.empty(0, device=device)
        except (AssertionError, RuntimeError) as error:
            raise ValueError(
                f"device={value!r} cannot hold tensors here (torch {torch.__version__}, CUDA available: "
                f"{torch.cuda.is_available()}): {error}. Pass a device this machine has, or None for the student's"
            ) from None
    return device


# Frames of these packages are skipped when a warning looks for the line of user code to point at.
_INTERNAL = ("ignite_ema", "ignite", "torch", "contextlib")


def warn_at_caller(message: str) -> None:
    """``warnings.warn(message)`` pointing at the first frame outside ignite_ema, Ignite and torch.

    A warning raised inside an Ignite event points at the user's
    ``trainer.run(...)``, one raised by a constructor at the line that built it.
    """
    frame = sys._getframe(1)
    level = 2  # the caller of this function
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in _INTERNAL:
        frame = frame.f_back
        level += 1
    warnings.warn(message, UserWarning, stacklevel=level)


def check_same_shapes(
    expected: Mapping[str, torch.Size],
    found: Mapping[str, torch.Size],
    what: str,
    *,
    hint: str,
    reference: str = "the EMA model",
) -> None:
    """Raise ValueError naming the first tensor missing, extra or of another shape, with ``hint``: what to do."""
    for name, shape in expected.items():
        if name not in found:
            raise ValueError(f"{what} has no tensor '{name}' (shape {tuple(shape)}), which {reference} has: {hint}")
        if found[name] != shape:
            raise ValueError(
                f"tensor '{name}' has shape {tuple(found[name])} in {what}, {tuple(shape)} in {reference}: {hint}"
            )
    for name, shape in found.items():
        if name not in expected:
            raise ValueError(f"{what} has a tensor '{name}' (shape {tuple(shape)}) that {reference} lacks: {hint}")


def warn_if_decay(momentum: float) -> None:
    """Warn that a momentum above 0.5 may be a decay (the weight of the old value) passed as a momentum."""
    warn_at_caller(
        f"momentum={momentum} is the weight of the new value (ema = (1 - momentum) * ema + momentum * "
        f"student), so this EMA forgets within a few updates. If {momentum} is a decay (timm, torch, "
        f"Composer), pass momentum={1 - momentum:.6g}: decay = 1 - momentum"
    )


def check_keys(state: Mapping[str, object], expected: Sequence[str], what: str) -> None:
    """Raise ValueError naming the keys of ``state`` that are missing from or extra to ``expected``."""
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    if missing or extra:
        found = ", ".join(f"{kind} {keys}" for kind, keys in (("missing", missing), ("unexpected", extra)) if keys)
        raise ValueError(
            f"{what} does not have the keys of a state_dict() of this version ({list(expected)}): {found}. "
            "Nothing was loaded"
        )
