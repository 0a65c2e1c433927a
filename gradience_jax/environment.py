"""The run's environment: package versions and the quick-settings switch.

Supported names: ``versions``, ``fast_mode``, ``FAST_ENV``. Nothing here imports jax at
module level, so telemetry, the app and the benchmarks can record versions cheaply.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Iterable

__all__ = ["FAST_ENV", "fast_mode", "versions"]

FAST_ENV = "GRADIENCE_FAST"
"""Environment variable that selects the quick settings (CI sets it)."""

DEFAULT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "orbax-checkpoint",
                    "matplotlib")
NOT_INSTALLED = "not installed"


def versions(packages: Iterable[str] = DEFAULT_PACKAGES, *, device: bool = False,
             ) -> dict[str, str]:
    """Versions of Python, the platform, ``packages`` and this package.

    Args:
        packages: distribution names to look up; a missing one reads ``"not installed"``.
        device: also record ``device`` (the first JAX device's kind) and ``x64``; this
            imports jax and initialises its backend.

    Returns:
        ``{"python": ..., "platform": ..., "gradience_jax": ..., <package>: <version>}``.
    """
    out = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        out["gradience_jax"] = importlib.metadata.version("gradience-jax")
    except importlib.metadata.PackageNotFoundError:
        out["gradience_jax"] = getattr(sys.modules.get("gradience_jax"), "__version__",
                                       NOT_INSTALLED)
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = NOT_INSTALLED
    if device:
        import jax  # noqa: PLC0415 - only when asked, it starts the backend

        out["device"] = str(jax.devices()[0].device_kind)
        out["x64"] = str(bool(jax.config.jax_enable_x64))
    return out


def fast_mode(fast: bool | None = None) -> bool:
    """Whether to use the quick settings.

    Args:
        fast: an explicit choice; ``None`` reads the environment variable ``GRADIENCE_FAST``
            (``1`` / ``true`` / ``yes`` / ``on``, case-insensitive).

    Returns:
        ``bool(fast)`` when given, else the environment's choice.
    """
    if fast is not None:
        return bool(fast)
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")
