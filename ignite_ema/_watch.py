"""Whether a module may have had tensors replaced since a point in time, cheaply enough to ask at every update.

A tensor can leave a module in two ways that the EMA must notice:

- a new tensor object is registered (``model.head = nn.Linear(...)``,
  ``load_state_dict(..., assign=True)``, a buffer assigned anew): torch's
  global registration hooks see every one, so a process-wide counter tells
  that *something* was registered somewhere since the last look;
- the same object is given new storage: ``param.data = ...``, as
  ``model.double()`` and ``model.to(...)`` do for parameters (the data
  pointer changes), or a buffer replaced in its module's dict, as they do for
  buffers (without a hook).

:class:`TensorWatch` checks these with one integer comparison, one
``data_ptr()`` per parameter and one dict look-up per buffer of a
parameter-free module. Only when it reports a change does the caller walk
the module (the expensive part). Not seen here (the swap and the handler's
run start walk the module anyway): a parameter set to ``None`` or deleted,
which torch does without a hook; ``buffer.data = ...`` on a buffer of a
module that has parameters; writes into a module's ``_buffers`` dict by hand.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

__all__ = ["TensorWatch"]

_registrations = 0
_hooks_installed = False


def _count(module: nn.Module, name: str, value: object) -> None:
    global _registrations
    _registrations += 1


def _install_hooks() -> None:
    """Count registrations process-wide; the hooks return ``None``, so they change nothing they see."""
    global _hooks_installed
    if not _hooks_installed:
        register_module_parameter_registration_hook(_count)
        register_module_buffer_registration_hook(_count)
        register_module_module_registration_hook(_count)
        _hooks_installed = True


class TensorWatch:
    """A module's tensors as they were when the watch was made, and a cheap test of whether that still holds.

    Build a new watch whenever the tensors are looked up again: it holds the
    tensor objects it was made with.

    Args:
        module: the module whose tensors are watched.
        names: the tensors' qualified names (``"encoder.0.weight"``), as
            ``named_parameters`` / ``named_buffers`` give them.
    """

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        _install_hooks()
        self._tensors: dict[str, Tensor] = {}
        self._params: list[Tensor] = []
        self._buffer_slots: list[tuple[dict[str, Tensor | None], str]] = []
        for name in names:
            owner_name, _, key = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if key in owner._parameters:
                self._params.append(owner._parameters[key])  # type: ignore[arg-type]
            elif not owner._parameters:
                # _apply converts a module's parameters with its buffers, so a buffer beside a parameter is covered
                # by that parameter's pointer; only buffers of parameter-free modules need a look of their own.
                self._buffer_slots.append((owner._buffers, key))
            slots = owner._parameters if key in owner._parameters else owner._buffers
            self._tensors[name] = slots[key]  # type: ignore[assignment]
        self._pointer = Tensor.data_ptr if not any(map(_is_dtensor, self._params)) else _shard_pointer
        self._mark()

    def _mark(self) -> None:
        self._seen = _registrations
        self._pointers = list(map(self._pointer, self._params))
        self._buffers = [slots.get(key) for slots, key in self._buffer_slots]

    def changed(self) -> bool:
        """Whether, since the watch was made, anything was registered anywhere, a parameter was given new storage
        (``.data =``), or a buffer was replaced in its module."""
        if self._seen != _registrations or list(map(self._pointer, self._params)) != self._pointers:
            return True
        now = [slots.get(key) for slots, key in self._buffer_slots]
        return any(map(operator.is_not, now, self._buffers))

    def holds(self, tensors: Mapping[str, Tensor]) -> bool:
        """Whether ``tensors`` (a fresh look-up by name) are the very objects, with the very storage, watched; if so,
        the watch takes the registrations seen so far as harmless (a module built elsewhere, a loss, say)."""
        same = (
            list(tensors) == list(self._tensors)
            and all(tensors[n] is t for n, t in self._tensors.items())
            and list(map(self._pointer, self._params)) == self._pointers
        )
        if same:
            self._mark()
        return same

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickled in a new process: count its registrations from here, and look the module up at once."""
        self.__dict__.update(state)
        _install_hooks()
        self._seen = -1


def _is_dtensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "_local_tensor")


def _shard_pointer(tensor: Tensor) -> int:
    """The data pointer of a DTensor's shard on this rank (a DTensor has no storage of its own), or a tensor's."""
    local = getattr(tensor, "_local_tensor", None)
    return int((tensor if local is None else local).data_ptr())
