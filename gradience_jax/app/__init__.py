"""The application layer (top of the tree): the command line, the analysis report, checkpoints.

Nothing below imports from here; ``import gradience_jax`` does not import this package.

Modules:

* :mod:`~gradience_jax.app.cli`: the ``gradience-jax`` command (``main``).
* :mod:`~gradience_jax.app.report`: the ``analyze`` job (``AnalysisConfig``, ``analyze``),
  with :mod:`~gradience_jax.app.measurements` (what it measures and the consistency
  checks), :mod:`~gradience_jax.app.markdown` (``report.md`` and the summary rows),
  :mod:`~gradience_jax.app.html` (``report.html``) and :mod:`~gradience_jax.plots.report`
  (its PNG figures). Your own models: :mod:`gradience_jax.models.external`.
* :mod:`~gradience_jax.app.track`: the ``track`` job (metrics over a run's checkpoints,
  resumable telemetry), figures in :mod:`~gradience_jax.plots.track`.
* :mod:`~gradience_jax.app.checkpoints`: msgpack / orbax parameter files (item, step and
  ``CheckpointManager`` run directories, ``.safetensors``), and built-in models restored
  from them; :mod:`~gradience_jax.app.families`: those built-in model
  families and their generated data.
* :mod:`~gradience_jax.app.protocols`: Protocols A-D run and drawn (the ``protocol``
  command's table); :mod:`~gradience_jax.app.seed_figures`: the seed figures (the
  ``figures`` command's table).
"""
