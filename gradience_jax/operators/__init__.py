"""Curvature matrices as matrix-free :class:`LinearOperator` s (the bottom layer).

One idea per module: ``base`` (``LinearOperator``, ``from_dense``, ``from_matvec``, sums,
scaling, ``damped``), ``heads`` (``Head``, ``compose``, the built-in heads), ``hessian``,
``ggn`` (``ggn``, ``SplitModel``), ``fisher`` (``empirical_fisher``, ``mc_fisher``),
``kfac``, ``select`` (``params_filter``), ``data`` (``dataset_operator``) and ``registry``
(``build(name, ...)``, ``names()``: the one vocabulary of operator names). The names are
imported from their modules (``gradience_jax.operators.hessian`` is the module; the public
functions are re-exported by :mod:`gradience_jax`).

Supported names: none defined here (this package has no ``__all__``); each submodule's
docstring lists its supported names, and :mod:`gradience_jax` re-exports the main ones.
"""
