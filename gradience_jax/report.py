"""Compatibility path of the analysis report: the names now live in :mod:`gradience_jax.app`.

* the job: :mod:`gradience_jax.app.report` (``AnalysisConfig``, ``analyze``, ``plan``,
  ``train``, ``check_writable``, ``versions``, ``write_weights_report``, ``SCHEMA``,
  ``OPERATORS``, ``REORTH``),
* the measurements: :mod:`gradience_jax.app.measurements` (``evaluate``),
* the text: :mod:`gradience_jax.app.markdown` (``summary_rows``),
* checkpoints and built-in models: :mod:`gradience_jax.app.checkpoints`
  (``CheckpointError``, ``save_checkpoint``, ``load_checkpoint``, ``to_pure_dict``,
  ``match_spec``, ``infer_model``, ``Restored``, ``restore_model``, ``init_model``) and
  :mod:`gradience_jax.app.families` (``MODELS``, ``default_spec``, ``build_model``,
  ``dataset``, ``split``),
* ``fast_mode`` / ``FAST_ENV``: :mod:`gradience_jax.environment`.

Supported names: all of the above, re-exported unchanged.
"""

from gradience_jax.app.checkpoints import (
    CheckpointError,
    Restored,
    infer_model,
    init_model,
    load_checkpoint,
    match_spec,
    restore_model,
    save_checkpoint,
    to_pure_dict,
)
from gradience_jax.app.families import MODELS, build_model, dataset, default_spec, split
from gradience_jax.app.markdown import summary_rows
from gradience_jax.app.measurements import evaluate
from gradience_jax.app.report import (
    OPERATORS,
    REORTH,
    SCHEMA,
    AnalysisConfig,
    Progress,
    analyze,
    check_writable,
    plan,
    train,
    versions,
    write_weights_report,
)
from gradience_jax.environment import FAST_ENV, fast_mode

__all__ = [
    "AnalysisConfig",
    "CheckpointError",
    "FAST_ENV",
    "MODELS",
    "OPERATORS",
    "Progress",
    "REORTH",
    "Restored",
    "SCHEMA",
    "analyze",
    "build_model",
    "check_writable",
    "dataset",
    "default_spec",
    "evaluate",
    "fast_mode",
    "infer_model",
    "init_model",
    "load_checkpoint",
    "match_spec",
    "plan",
    "restore_model",
    "save_checkpoint",
    "split",
    "summary_rows",
    "to_pure_dict",
    "train",
    "versions",
    "write_weights_report",
]
