"""JSON-safe conversion shared by the result records (``to_dict`` / ``report.json``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def jsonable(v: Any) -> Any:
    """JSON-safe copy of ``v`` for ``json.dumps`` (strict JSON: no ``NaN`` tokens).

    Numpy / jax scalars and arrays become Python (nested lists), mappings dicts with string
    keys, non-finite floats ``None`` and unknown objects ``str``.

    Args:
        v: any value (nested mappings, sequences, arrays, scalars).

    Returns:
        The converted value.
    """
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.ndarray, jax.Array)):
        a = np.asarray(v)
        return jsonable(a.item()) if a.ndim == 0 else [jsonable(x) for x in a.tolist()]
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return str(v)
