"""Private PyTorch / torchvision APIs behind a check, each with the plain computation as fallback.

The fast inference paths (:func:`omniseg.optimize_for_inference`) call a few APIs that are not
part of any stability promise: oneDNN's fused convolution op, NNPACK's convolution, oneDNN weight
pre-packing, tensor version counters, torchvision's RoI pooling helpers. Each is wrapped in a
:class:`PrivateOp`, which looks it up and runs it once on a tiny input the first time a fast path
asks for it. If it is missing, raises, or computes something else, ``get()`` returns ``None`` and
the caller takes its plain path; a broken op (one that exists but fails) warns once. The check
happens lazily, so importing omniseg never touches these APIs, and a plain model never does.

Call sites also catch errors of later calls and hand them to :meth:`PrivateOp.fail`, which
switches the op off for the rest of the process.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["PRIVATE_OPS", "VERSION_COUNTER", "PrivateOp", "reset_private_ops", "tensor_key"]

_UNCHECKED = object()

PRIVATE_OPS: dict[str, PrivateOp] = {}


class PrivateOp:
    """A private API, resolved and probed once: :meth:`get` returns it, or ``None`` for the plain path.

    ``resolve()`` returns the callable (or any object the call site needs); an ``AttributeError``,
    ``ImportError`` or ``LookupError`` means the API is missing. ``probe(op)`` runs it on a tiny
    input and returns whether the result is right; an exception counts as no.
    """

    def __init__(self, name: str, resolve: Callable[[], Any], probe: Callable[[Any], bool] | None = None) -> None:
        self.name = name
        self._resolve = resolve
        self._probe = probe
        self._op: Any = _UNCHECKED
        self.reason: str | None = None
        PRIVATE_OPS[name] = self

    def get(self) -> Any:
        """The op if it exists and passed its probe; ``None`` otherwise (checked once, then cached)."""
        if self._op is _UNCHECKED:
            self._op = self._check()
        return self._op

    def available(self) -> bool:
        return self.get() is not None

    def _check(self) -> Any:
        # probes make ordinary tensors (with version counters) even when asked under inference_mode
        with torch.inference_mode(False), torch.no_grad():
            return self._check_now()

    def _check_now(self) -> Any:
        try:
            op = self._resolve()
        except (AttributeError, ImportError, LookupError, RuntimeError, NotImplementedError) as exc:
            self.reason = f"missing ({type(exc).__name__}: {exc})"
            return None
        if op is None:
            self.reason = "missing"
            return None
        if self._probe is not None:
            try:
                ok = bool(self._probe(op))
            except Exception as exc:  # any failure of a private op means: do not use it
                self._warn(f"raised {type(exc).__name__}: {exc}")
                return None
            if not ok:
                self._warn("gave wrong results on a test input")
                return None
        return op

    def fail(self, exc: BaseException) -> None:
        """A call at a call site raised: never use the op again in this process (one warning)."""
        self._op = None
        self._warn(f"raised {type(exc).__name__}: {exc}", stacklevel=4)

    def _warn(self, reason: str, stacklevel: int = 5) -> None:
        self.reason = reason
        warnings.warn(f"{self.name} {reason}; using the plain path instead", RuntimeWarning, stacklevel=stacklevel)

    def reset(self) -> None:
        """Forget the outcome: the next :meth:`get` resolves and probes again (tests, after patching)."""
        self._op = _UNCHECKED
        self.reason = None


def reset_private_ops() -> None:
    """:meth:`PrivateOp.reset` on every registered op."""
    for op in PRIVATE_OPS.values():
        op.reset()


# ------------------------------------------------------------------------- Tensor._version
def _resolve_version() -> Callable[[Tensor], int]:
    try:
        torch.zeros(1)._version  # noqa: B018 - an AttributeError here means: no such API
    except AttributeError:
        raise
    except Exception:  # there, but broken: the probe reports it (with a warning)
        pass
    return operator.attrgetter("_version")


def _probe_version(version: Callable[[Tensor], int]) -> bool:
    t = torch.zeros(2)
    before = version(t)
    t.add_(1)
    after = version(t)
    return isinstance(before, int) and isinstance(after, int) and after != before


VERSION_COUNTER = PrivateOp("torch.Tensor._version", _resolve_version, _probe_version)


def tensor_key(t: Tensor) -> tuple | None:
    """Identifies a tensor's storage and contents version, for caches of derived weights; ``None``
    where PyTorch's (private) version counter is unusable: then nothing may be cached.

    Inference tensors (made under ``torch.inference_mode``) have no version counter; they cannot
    be changed in place outside inference mode, so their storage identifies them.
    """
    version = VERSION_COUNTER.get()
    if version is None:
        return None
    if t.is_inference():
        return (t.data_ptr(), -1, t.dtype, t.device)
    try:
        return (t.data_ptr(), version(t), t.dtype, t.device)
    except (AttributeError, RuntimeError) as exc:
        VERSION_COUNTER.fail(exc)
        return None
