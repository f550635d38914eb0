"""Loads the compiled extension gapfix._C, which registers torch.ops.gapfix.*.

If it fails to load, the ops fall back to their PyTorch references and this
module says so once, loudly, with the reason: a missing native build is never
silent.
"""
import warnings

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

LOAD_ERROR: ImportError | None = None
try:
    from gapfix import _C  # noqa: F401  (importing registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    LOAD_ERROR = exc
    warnings.warn(
        f"gapfix._C failed to load ({exc}); native ops fall back to their slow "
        "PyTorch references. Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


def build_info() -> str:
    if _C is None:
        return f"not loaded: {LOAD_ERROR}"
    return torch.ops.gapfix.build_info()
