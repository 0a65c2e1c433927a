"""Curvature matrices as matrix-free :class:`LinearOperator` s."""
