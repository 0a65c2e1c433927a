"""Weight matrices from checkpoint files: ``.safetensors`` (single or sharded) and LoRA.

``.safetensors`` is the format nearly every published checkpoint ships in. It is read with
the ``safetensors`` package's NumPy API (``safe_open(framework="np")``; no torch), tensors
named as in the file (``"model.layers.0.self_attn.q_proj.weight"``) in a flat
``{name: np.ndarray}`` dict, which :func:`~gradience_jax.weights.weight_spectra` takes as a
pytree. Dtypes NumPy lacks (``BF16``, ``F8_*``) come back as ``ml_dtypes`` arrays (the
package JAX ships); where the installed ``safetensors`` refuses them for NumPy, the raw bytes
are read from the file's header offsets instead.

Accepted paths: a ``.safetensors`` file; a sharded checkpoint's index
(``model.safetensors.index.json``, whose ``weight_map`` names the shard of every tensor);
a directory holding either; or one shard (``model-00001-of-00003.safetensors``), which
loads the whole checkpoint it belongs to (its sibling index, else all its sibling shards)
unless ``shard_only=True``.

Orientation: PyTorch (and so Hugging Face) ``Linear`` weights are stored ``(out, in)``,
Flax kernels ``(in, out)``. Every metric of ``weight_spectra`` depends only on the singular
values, which a transpose does not change: ``layer_spectrum`` transposes a matrix so that
``N = max(shape)`` rows meet ``M = min(shape)`` columns and the ESD is the ``M`` eigenvalues
of ``W^T W / N``, the same for ``W`` and ``W^T``; the report's ``shape`` is the file's.
Kernels with more than 2 axes are matricized by :func:`file_reshape`: PyTorch convolution
weights ``(out, in, *kernel) -> (out, in * prod(kernel))`` (the transpose of Flax's
``"leading"`` rule up to a column permutation: the same singular values), Flax kernels by
the ``"auto"`` rule of :mod:`~gradience_jax.weights.reshape`.

LoRA (PEFT naming): a pair ``<module>.lora_A.weight`` ``(r, in)`` and
``<module>.lora_B.weight`` ``(out, r)`` is the update ``delta W = scale * B @ A`` of
``<module>.weight``; :func:`lora_pairs` finds the pairs, :func:`lora_deltas` forms the
products (``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, read from PEFT's
``adapter_config.json`` when given), named ``<module>.lora_delta``.

:func:`weight_spectra_from_file` streams a checkpoint through ``weight_spectra`` one tensor
at a time (memory: one tensor, plus the LoRA factors), so it equals
``weight_spectra(load_safetensors(path), reshape=file_reshape)`` without holding the whole
model (bf16 / f16 / fp8 tensors analysed as float32, see there).

Supported names: ``load_safetensors``, ``safetensors_files``, ``file_reshape``,
``lora_pairs``, ``lora_deltas``, ``weight_spectra_from_file``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._validate import ArgumentTypeError, check_choice, check_real
from gradience_jax.weights.report import WeightSpectraReport, _natural_key, weight_spectra
from gradience_jax.weights.reshape import apply_reshape_rule, reshape_rule_for

__all__ = [
    "file_reshape",
    "load_safetensors",
    "lora_deltas",
    "lora_pairs",
    "safetensors_files",
    "weight_spectra_from_file",
]

_INDEX_SUFFIX = ".safetensors.index.json"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?P<adapter>\.[^.]+)?\.weight$")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
_LORA_MODES = ("delta", "factors", "both")


def _raw_dtypes() -> dict[str, np.dtype]:
    """The safetensors dtype codes -> NumPy / ml_dtypes dtypes (for the raw-bytes reader)."""
    import ml_dtypes  # noqa: PLC0415 - ships with jax; only for dtypes NumPy lacks

    table: dict[str, Any] = {
        "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
        "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
        "F16": np.float16, "F32": np.float32, "F64": np.float64,
        "BF16": ml_dtypes.bfloat16,
    }
    for code, name in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"),
                       ("F8_E8M0", "float8_e8m0fnu")):
        if hasattr(ml_dtypes, name):
            table[code] = getattr(ml_dtypes, name)
    return {k: np.dtype(v).newbyteorder("<") for k, v in table.items()}


def _safetensors() -> Any:
    try:
        import safetensors  # noqa: PLC0415 - optional extra [files]
    except ImportError as exc:
        raise ImportError(
            "reading .safetensors files needs the safetensors package: "
            "pip install 'gradience-jax[files]' (or pip install safetensors)"
        ) from exc
    return safetensors


# --------------------------------------------------------------------------------------
# Which files make up a checkpoint
# --------------------------------------------------------------------------------------


def _check_path(value: Any, name: str = "path") -> Path:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str):
            if not text:
                raise ValueError(f"{name} must not be empty")
            return Path(text)
    raise ArgumentTypeError(f"{name} must be a str or os.PathLike path, got "
                            f"{type(value).__name__}")


def _read_index(index: Path) -> dict[str, Path]:
    """``weight_map`` of an index file as ``{tensor name: shard path}``; shards must exist."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index}: not a safetensors index (invalid JSON: {exc})") from exc
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise ValueError(f"{index}: not a safetensors index (needs a non-empty 'weight_map' "
                         "of tensor name -> shard file name)")
    by_shard: dict[str, list[str]] = {}
    for name, shard in wmap.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        file = index.parent / shard
        if not file.is_file():
            raise FileNotFoundError(
                errno.ENOENT,
                f"{index.name} maps {len(names)} tensor(s) (e.g. {names[0]!r}) to shard "
                f"{shard!r}, which is missing from {index.parent}",
                str(file),
            )
    return {name: index.parent / shard for name, shard in wmap.items()}


def _shard_set(file: Path) -> list[Path] | None:
    """All shards ``stem-XXXXX-of-NNNNN.safetensors`` of ``file``'s set, or None."""
    m = _SHARD.match(file.name)
    if m is None:
        return None
    n, width = int(m["n"]), len(m["i"])
    files = [file.parent / f"{m['stem']}-{i:0{width}d}-of-{m['n']}.safetensors"
             for i in range(1, n + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(errno.ENOENT, f"shard set {m['stem']}-*-of-{m['n']} is "
                                f"incomplete: missing {missing}", str(file.parent / missing[0]))
    return files


def _sibling_index(file: Path) -> Path | None:
    """An index in ``file``'s directory whose ``weight_map`` lists ``file``."""
    for index in sorted(file.parent.glob(f"*{_INDEX_SUFFIX}")):
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if isinstance(wmap, dict) and file.name in wmap.values():
            return index
    return None


def _resolve(path: Path, shard_only: bool) -> tuple[list[Path], dict[str, Path] | None]:
    """(files, weight_map or None) of the checkpoint at ``path``."""
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such safetensors file, index or directory",
                                str(path))
    if path.is_dir():
        preferred = path / f"model{_INDEX_SUFFIX}"
        indices = [preferred] if preferred.is_file() else sorted(path.glob(f"*{_INDEX_SUFFIX}"))
        if len(indices) > 1:
            raise ValueError(f"{path}: holds several safetensors indices "
                             f"{[p.name for p in indices]}; pass the one to read")
        if indices:
            return _resolve(indices[0], shard_only)
        files = sorted(path.glob("*.safetensors"))
        if (path / "model.safetensors").is_file():
            return [path / "model.safetensors"], None
        if not files:
            raise FileNotFoundError(errno.ENOENT, "directory holds no .safetensors file nor "
                                    f"a *{_INDEX_SUFFIX}", str(path))
        if len(files) == 1:
            return files, None
        sets = {tuple(s) for s in (_shard_set(f) for f in files) if s is not None}
        if len(sets) == 1 and set(next(iter(sets))) == set(files):
            return list(next(iter(sets))), None
        raise ValueError(f"{path}: holds several .safetensors files "
                         f"{[f.name for f in files][:8]} and no index; pass the file to read")
    if path.name.endswith(".json"):
        wmap = _read_index(path)
        return sorted(set(wmap.values()), key=lambda p: _natural_key(p.name)), wmap
    if shard_only:
        return [path], None
    index = _sibling_index(path)
    if index is not None:
        return _resolve(index, shard_only)
    shards = _shard_set(path)
    return (shards, None) if shards is not None else ([path], None)


def safetensors_files(path: str | os.PathLike, *, shard_only: bool = False) -> list[Path]:
    """The ``.safetensors`` files that make up the checkpoint at ``path``.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` index, or a directory
            holding one of them (``model.safetensors.index.json`` / ``model.safetensors``
            first).
        shard_only: read only the given shard, not the sharded checkpoint it belongs to.

    Returns:
        The shard paths in order (one path for a single file).

    Raises:
        FileNotFoundError: no such path, a directory without a checkpoint, or an index /
            shard set naming a shard that does not exist (the message names it).
        ValueError: an index that is not valid JSON or lacks a ``weight_map``; a directory
            with several unrelated checkpoints (the message lists them).
        ArgumentTypeError: ``path`` is not a ``str`` / ``os.PathLike``.
    """
    return _resolve(_check_path(path), bool(shard_only))[0]


# --------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------


def _read_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file, checked for consistency."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: not a safetensors file ({size} bytes, shorter than "
                             "its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{file}: not a safetensors file (corrupt header: it claims "
                             f"{n} header bytes in a {size}-byte file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a safetensors file (corrupt header: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file (corrupt header: not a JSON object)")
    return 8 + n, header


def _raw_tensor(file: Path, name: str, start: int, entry: Mapping[str, Any]) -> np.ndarray:
    """One tensor read from its bytes (little endian) at the header's offsets."""
    code = entry.get("dtype")
    dtype = _raw_dtypes().get(code)
    if dtype is None:
        raise ValueError(f"{file}: tensor {name!r} has dtype {code!r}, which neither NumPy "
                         "nor ml_dtypes represents")
    shape = tuple(int(d) for d in entry.get("shape", ()))
    begin, end = (int(x) for x in entry["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{file}: tensor {name!r} (shape {shape}, {code}) has "
                         f"{end - begin} bytes of data, expected "
                         f"{math.prod(shape) * dtype.itemsize}")
    with open(file, "rb") as fh:
        fh.seek(start + begin)
        data = fh.read(end - begin)
    if len(data) != end - begin:
        raise ValueError(f"{file}: tensor {name!r} is truncated (the file ends early)")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _is_float(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _nonfinite_counts(array: np.ndarray) -> tuple[int, int] | None:
    """(number of NaN, number of +-Inf) entries of a floating array, or None if all finite."""
    if not _is_float(array.dtype) or array.size == 0:
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    nan = int(np.isnan(array).sum())
    return nan, int(array.size - finite.sum()) - nan


def _nonfinite_error(where: str, bad: dict[str, tuple[int, int]]) -> FloatingPointError:
    items = [f"{k} ({n} NaN, {i} Inf)" for k, (n, i) in bad.items()]
    shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
    return FloatingPointError(f"{where}: non-finite values in {len(items)} tensor(s): {shown}; "
                              "pass check_finite=False to load them anyway")


def _selector(select: Any) -> tuple[Callable[[str], bool], set[str] | None]:
    """``select`` (None, a predicate on names, or names) -> (predicate, required names)."""
    if select is None:
        return (lambda _name: True), None
    if callable(select):
        return select, None
    if isinstance(select, (str, bytes)) or not isinstance(select, Iterable):
        raise ArgumentTypeError("select must be None, a callable name -> bool, or an iterable "
                                f"of tensor names (e.g. [{select!r}]), got "
                                f"{type(select).__name__}")
    names = set(select)
    for n in names:
        if not isinstance(n, str):
            raise ArgumentTypeError(f"select must hold tensor names (str), got {n!r}")
    return names.__contains__, names


def _iter_tensors(path: Any, select: Any, shard_only: bool) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` of every selected tensor of the checkpoint, one at a time."""
    safetensors = _safetensors()
    files, wmap = _resolve(_check_path(path), bool(shard_only))
    wanted, required = _selector(select)
    if wmap is not None:
        files = [f for f in files if any(wanted(n) for n, s in wmap.items() if s == f)]
    seen: dict[str, Path] = {}
    for file in files:
        start, header = _read_header(file)
        try:
            handle = safetensors.safe_open(str(file), framework="np")
        except Exception as exc:  # SafetensorError (an Exception), OSError
            raise ValueError(f"{file}: not a valid safetensors file ({exc})") from exc
        with handle as fh:
            names = [n for n in fh.keys() if wanted(n)]
            if wmap is not None:
                listed = {n for n, s in wmap.items() if s == file and wanted(n)}
                absent = sorted(listed - set(fh.keys()))
                if absent:
                    raise ValueError(f"the index maps tensor(s) {absent[:5]} to {file.name}, "
                                     "which does not hold them")
            for name in sorted(names, key=_natural_key):
                if name in seen:
                    raise ValueError(f"tensor {name!r} is in both {seen[name].name} and "
                                     f"{file.name}")
                seen[name] = file
                try:
                    array = fh.get_tensor(name)
                except Exception:  # noqa: BLE001 - e.g. BF16 refused by an older numpy API
                    array = _raw_tensor(file, name, start, header[name])
                yield name, np.asarray(array)
    if required is not None:
        missing = sorted(required - set(seen))
        if missing:
            raise KeyError(f"select names tensor(s) {missing[:10]} not in {path}")


def load_safetensors(
    path: str | os.PathLike,
    *,
    select: Callable[[str], bool] | Iterable[str] | None = None,
    check_finite: bool = True,
    shard_only: bool = False,
) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` checkpoint (single file or sharded), by name.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json`` index, a directory
            holding either, or one shard (which loads its whole checkpoint).
        select: only these tensors: a predicate ``name -> bool`` or an iterable of names
            (shards holding none of them are not opened).
        check_finite: raise if a floating-point tensor holds NaN or Inf.
        shard_only: read only the given shard, not the sharded checkpoint it belongs to.

    Returns:
        ``{name: np.ndarray}`` with the names and dtypes of the file (``BF16`` / ``F8_*``
        as ``ml_dtypes`` arrays), in natural order of the names.

    Raises:
        FileNotFoundError: no such path, or an index / shard set naming a missing shard.
        ValueError: a corrupt file (bad header length, header not JSON, wrong data size),
            an invalid index, a tensor listed in the index but absent from its shard, a
            tensor in two shards, a directory holding several unrelated checkpoints.
        KeyError: ``select`` names a tensor the checkpoint does not hold.
        FloatingPointError: (``check_finite``) NaN / Inf entries; the message lists every
            such tensor with its counts.
        ImportError: the ``safetensors`` package is missing (``pip install
            'gradience-jax[files]'``).
        ArgumentTypeError: ``path`` is not a path, ``select`` of the wrong kind.

    Example:
        >>> import tempfile, numpy as np
        >>> from safetensors.numpy import save_file
        >>> file = Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> save_file({"fc.weight": np.eye(3, 4, dtype=np.float32)}, str(file))
        >>> {k: v.shape for k, v in load_safetensors(file).items()}
        {'fc.weight': (3, 4)}
        >>> import shutil
        >>> shutil.rmtree(file.parent)
    """
    tensors: dict[str, np.ndarray] = {}
    bad: dict[str, tuple[int, int]] = {}
    for name, array in _iter_tensors(path, select, shard_only):
        counts = _nonfinite_counts(array) if check_finite else None
        if counts is not None:
            bad[name] = counts
        tensors[name] = array
    if bad:
        raise _nonfinite_error(str(path), bad)
    return tensors


# --------------------------------------------------------------------------------------
# Layouts and LoRA
# --------------------------------------------------------------------------------------


def file_reshape(path: str, leaf: Any) -> np.ndarray | None:
    """``weight_spectra(reshape=...)`` rule for checkpoint files with dotted names.

    Kernels with more than 2 axes: a PyTorch ``*.weight`` ``(out, in, *kernel)`` becomes
    ``(out, in * prod(kernel))``; a Flax ``*.kernel`` (``.`` or ``/`` separated names)
    follows the ``"auto"`` rule of :mod:`~gradience_jax.weights.reshape`. Anything else
    (2-D matrices, vectors, unknown names) returns ``None``: the auto rule decides.

    Args:
        path: the tensor's name.
        leaf: the tensor.

    Returns:
        The 2-D matrix, or ``None``.
    """
    shape = tuple(np.shape(leaf))
    if len(shape) <= 2:
        return None
    parts = [p for p in re.split(r"[./]", path) if p]
    name = parts[-1] if parts else ""
    if name == "weight":
        return np.reshape(np.asarray(leaf), (shape[0], -1))
    if name == "kernel":
        rule, _ = reshape_rule_for("/".join(parts), shape)
        return None if rule is None else apply_reshape_rule(np.asarray(leaf), rule)
    return None


def lora_pairs(tensors: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """LoRA factor pairs in PEFT naming: ``{module: (lora_A name, lora_B name)}``.

    ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (saved adapters) and
    ``<module>.lora_A.<adapter>.weight`` (in-memory state dicts; the module key then ends in
    ``.<adapter>``).

    Args:
        tensors: ``{name: array}`` (e.g. from :func:`load_safetensors`).

    Returns:
        The pairs, in natural order of the module names (empty when there is no LoRA).

    Raises:
        ValueError: a ``lora_A`` without its ``lora_B`` (or the reverse).
        ArgumentTypeError: ``tensors`` is not a mapping.
    """
    if not isinstance(tensors, Mapping):
        raise ArgumentTypeError(f"tensors must be a mapping name -> array, got "
                                f"{type(tensors).__name__}")
    found: dict[str, dict[str, str]] = {}
    for name in tensors:
        m = _LORA.match(name) if isinstance(name, str) else None
        if m is not None:
            found.setdefault(m["module"] + (m["adapter"] or ""), {})[m["which"]] = name
    for ab in found.values():
        if len(ab) != 2:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise ValueError(f"LoRA factor {ab[have]!r} has no lora_{lack} partner "
                             f"(expected {ab[have].replace(f'lora_{have}', f'lora_{lack}')!r})")
    return {m: (found[m]["A"], found[m]["B"]) for m in sorted(found, key=_natural_key)}


def _read_config(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    file = _check_path(config, "config")
    if file.is_dir():
        file = file / "adapter_config.json"
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not a PEFT adapter config (invalid JSON: {exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{file}: not a PEFT adapter config (not a JSON object)")
    return doc


def _config_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scale of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    alpha = config.get("lora_alpha", config.get("alpha"))
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            alpha = value
            break
    if alpha is None:
        raise ValueError("the adapter config has no 'lora_alpha'")
    alpha = check_real(alpha, "lora_alpha")
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pair_matrices(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """A ``(r, in...)`` -> ``(r, in)``; B ``(out, r, 1...)`` -> ``(out, r)``; shapes checked."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"LoRA factors {names[0]!r} {a.shape} and {names[1]!r} {b.shape} "
                         "must have at least 2 axes")
    r = a.shape[0]
    if b.shape[1] != r or any(d != 1 for d in b.shape[2:]):
        raise ValueError(f"LoRA factors do not match: {names[0]!r} has shape {a.shape} "
                         f"(rank {r} first), {names[1]!r} has shape {b.shape} (needs "
                         f"(out, {r}, 1, ...))")
    dtype = np.result_type(np.float32, *(np.float64 if x.dtype == np.float64 else np.float32
                                         for x in (a, b)))
    return a.reshape(r, -1).astype(dtype), b.reshape(b.shape[0], r).astype(dtype)


def lora_deltas(
    tensors: Mapping[str, Any],
    *,
    scale: float | None = None,
    alpha: float | None = None,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """The LoRA updates ``delta W = s * B @ A`` of every pair, as ``<module>.lora_delta``.

    ``A`` is ``(r, in)`` (or a conv ``(r, in, *kernel)``, flattened), ``B`` is ``(out, r)``
    (or ``(out, r, 1, 1)``), so ``delta W`` is ``(out, in)`` like the module's weight. The
    scale ``s`` is ``scale`` if given, else ``alpha / r`` with each pair's rank ``r``, else
    PEFT's from ``config`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``:
    ``alpha / sqrt(r)``), else 1. Computed in float32 (float64 for float64 factors).

    Args:
        tensors: ``{name: array}`` holding PEFT-named factors (see :func:`lora_pairs`).
        scale: one multiplier for every pair.
        alpha: LoRA's alpha: ``s = alpha / r`` per pair.
        config: PEFT's ``adapter_config.json`` (a dict, its path, or its directory).

    Returns:
        ``{"<module>.lora_delta": delta W}`` (empty when there is no LoRA pair).

    Raises:
        ValueError: more than one of ``scale`` / ``alpha`` / ``config``; a non-finite scale
            or alpha; unpaired or mismatched factors; a config without ``lora_alpha``.
        ArgumentTypeError: ``tensors`` is not a mapping, ``scale`` / ``alpha`` not real.
    """
    given = [n for n, v in (("scale", scale), ("alpha", alpha), ("config", config))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of scale, alpha and config, got {given}")
    if scale is not None:
        scale = check_real(scale, "scale")
    if alpha is not None:
        alpha = check_real(alpha, "alpha")
    cfg = _read_config(config) if config is not None else None
    out: dict[str, np.ndarray] = {}
    for module, names in lora_pairs(tensors).items():
        a, b = _pair_matrices(tensors[names[0]], tensors[names[1]], names)
        r = a.shape[0]
        if scale is not None:
            s = scale
        elif alpha is not None:
            s = alpha / r
        elif cfg is not None:
            s = _config_scale(cfg, module, r)
        else:
            s = 1.0
        out[f"{module}.lora_delta"] = (b @ a) * a.dtype.type(s)
    return out


# --------------------------------------------------------------------------------------
# The whole file
# --------------------------------------------------------------------------------------


def _merge(parts: list[WeightSpectraReport]) -> WeightSpectraReport:
    layers, skipped, failed = {}, {}, {}
    for rep in parts:
        layers.update(rep.layers)
        skipped.update(rep.skipped)
        failed.update(rep.failed)
    order = sorted(layers, key=_natural_key)
    return WeightSpectraReport(layers={p: layers[p] for p in order}, skipped=skipped,
                               failed=failed)


def _adapter_config_near(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    file = folder / "adapter_config.json"
    return file if file.is_file() else None


def weight_spectra_from_file(
    path: str | os.PathLike,
    *,
    select: Callable[[str], bool] | Iterable[str] | None = None,
    lora: str = "delta",
    lora_scale: float | None = None,
    lora_alpha: float | None = None,
    lora_config: Mapping[str, Any] | str | os.PathLike | None = None,
    check_finite: bool = True,
    shard_only: bool = False,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> WeightSpectraReport:
    """``weight_spectra`` of a ``.safetensors`` checkpoint, read one tensor at a time.

    Layers are named as in the file. Without LoRA factors this equals
    ``weight_spectra(load_safetensors(path), reshape=file_reshape, **kwargs)`` for float32 /
    float64 files. LoRA pairs
    (:func:`lora_pairs`) are analysed as their product ``delta W`` (``lora="delta"``, layer
    ``<module>.lora_delta``), as the factors themselves (``"factors"``) or both; the scale
    comes from ``lora_scale``, ``lora_alpha`` or ``lora_config`` (see :func:`lora_deltas`),
    and by default from an ``adapter_config.json`` beside the file. Note: ``delta W`` has
    rank ``r``, so its ESD has at most ``r`` non-zero eigenvalues and no power-law fit when
    ``r < min_tail`` (``alpha`` is then ``None`` with the reason).

    Low-precision tensors (``BF16``, ``F16``, ``F8_*``) are analysed as the float32 arrays
    they exactly are (the SVD runs in float64 either way): the default numerical-rank
    tolerance ``max(shape) * eps(dtype)`` of their own dtype exceeds ``sigma_1`` for a
    bf16 matrix with more than 128 rows or columns, which would leave no eigenvalue for
    the power-law fit. ``weight_spectra(load_safetensors(path))`` keeps the file dtypes.

    Args:
        path: as in :func:`load_safetensors`.
        select: only these tensors (a predicate on names or an iterable of names).
        lora: ``"delta"``, ``"factors"`` or ``"both"``.
        lora_scale: one LoRA scale for every pair.
        lora_alpha: LoRA alpha (scale ``alpha / r``).
        lora_config: PEFT adapter config (dict, file or directory); default: the
            ``adapter_config.json`` next to ``path`` when neither ``lora_scale`` nor
            ``lora_alpha`` is given.
        check_finite: raise if any floating-point tensor holds NaN / Inf (the message lists
            every one); with ``False`` such matrices land in ``report.failed``.
        shard_only: read only the given shard.
        key: randomisation-baseline key, folded with each tensor's position in the file.
        **kwargs: passed to ``weight_spectra`` (``filter``, ``reshape`` (default
            :func:`file_reshape`), ``per_head``, ``rtol``, ``min_tail``, ``tw_level``).

    Returns:
        The ``WeightSpectraReport``.

    Raises:
        FileNotFoundError, ValueError, KeyError, ImportError: as :func:`load_safetensors`.
        FloatingPointError: (``check_finite``) NaN / Inf in the file, naming the tensors.
        ValueError: ``lora`` not one of ``("delta", "factors", "both")``; bad LoRA factors
            or scales; bad ``weight_spectra`` arguments; no tensor selected.
        ArgumentTypeError: an argument of the wrong kind.
    """
    lora = check_choice(lora, "lora", _LORA_MODES)
    if not isinstance(check_finite, (bool, np.bool_)):
        raise ArgumentTypeError(f"check_finite must be True or False, got {check_finite!r}")
    file = _check_path(path)
    if lora_config is None and lora_scale is None and lora_alpha is None:
        lora_config = _adapter_config_near(file) if file.exists() else None
    kwargs.setdefault("reshape", file_reshape)
    parts: list[WeightSpectraReport] = []
    factors: dict[str, np.ndarray] = {}
    bad: dict[str, tuple[int, int]] = {}
    count = 0

    def analyse(name: str, array: np.ndarray, index: int) -> None:
        k = None if key is None else jax.random.fold_in(key, index)
        if _is_float(array.dtype) and array.dtype.itemsize < 4:
            array = array.astype(np.float32)  # exact; see "Low-precision tensors" above
        parts.append(weight_spectra({name: array}, key=k, **kwargs))

    for index, (name, array) in enumerate(_iter_tensors(file, select, shard_only)):
        count += 1
        counts = _nonfinite_counts(array) if check_finite else None
        if counts is not None:
            bad[name] = counts
        if bad:  # keep scanning to name every bad tensor, analyse nothing more
            continue
        if _LORA.match(name):
            factors[name] = array
            if lora == "delta":
                continue
        analyse(name, array, index)
    if bad:
        raise _nonfinite_error(str(path), bad)
    if count == 0:
        raise ValueError(f"{path}: no tensor selected (select={select!r})")
    if lora in ("delta", "both") and factors:
        deltas = lora_deltas(factors, scale=lora_scale, alpha=lora_alpha, config=lora_config)
        for offset, (name, delta) in enumerate(deltas.items()):
            analyse(name, delta, count + offset)
    return _merge(parts)
