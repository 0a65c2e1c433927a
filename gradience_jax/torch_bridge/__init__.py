"""Weight transfer to PyTorch: the MLP, CNN and tiny transformer LM as ``torch.nn`` modules.

Each ``torch.nn`` module holds a copy of the Flax parameters, so both frameworks evaluate the
identical function (used by the agreement tests and the benchmarks against PyTorch peers:
PyHessian, curvlinops, BackPACK, hessian-eigenthings).

PyTorch is imported lazily inside the functions: ``import gradience_jax`` never imports
torch. Install the ``[torch]`` extra to use this module.

The bridge is a small package, every name re-exported here: ``layout`` (the leaf maps
below), ``model`` (:class:`TorchModel`: vectors, batches and losses across the two
frameworks), ``modules`` (:func:`to_torch` and the ``torch.nn`` copies of the built-in
models) and ``products`` (:class:`TorchProducts` and :func:`compare_trees`, the PyTorch-side
references of the peer cross-checks).

Layout conversions (Flax -> PyTorch; every one is a pure transpose / reshape, so the same
map carries parameters, tangent vectors, HVPs and gradients between the frameworks):

============================  ==========================  =================================
Flax leaf                     Flax shape                  PyTorch parameter
============================  ==========================  =================================
``nnx.Linear`` kernel         ``(in, out)``               ``nn.Linear.weight (out, in)``
                                                          = ``kernel.T``
``nnx.Linear`` / Conv bias    ``(out,)``                  ``bias (out,)`` unchanged
``nnx.Conv`` kernel           ``(kh, kw, in, out)``       ``nn.Conv2d.weight (out, in, kh, kw)``
                                                          = ``kernel.transpose(3, 2, 0, 1)``
CNN ``head`` kernel           ``(H*W*C, out)``, rows in   ``weight (out, C*H*W)``: rows re-ordered
                              NHWC-flatten order          to NCHW-flatten order
                                                          (``nn.Flatten`` of NCHW)
attention query/key/value     ``(d, heads, head_dim)``    ``nn.Linear.weight (heads*head_dim, d)``
                                                          = ``reshape(d, -1).T``
attention q/k/v bias          ``(heads, head_dim)``       ``bias (heads*head_dim,)``
attention ``out`` kernel      ``(heads, head_dim, d)``    ``nn.Linear.weight (d, heads*head_dim)``
                                                          = ``reshape(-1, d).T``
``nnx.LayerNorm`` scale/bias  ``(d,)``                    ``nn.LayerNorm.weight / bias``
                                                          (eps copied, 1e-6)
``nnx.Embed`` embedding       ``(V, d)``                  ``nn.Embedding.weight (V, d)`` unchanged
============================  ==========================  =================================

Inputs: images are NHWC in Flax and NCHW in PyTorch (``TorchModel.inputs`` permutes);
token and label ids become ``int64``. The PyTorch transformer returns logits flattened to
``(B*T, V)`` (and ``TorchModel.targets`` flattens the labels to ``(B*T,)``) so that
``nn.CrossEntropyLoss()`` -- which PyHessian, curvlinops and BackPACK expect -- computes the
same token-mean cross-entropy as ``gj.heads.softmax_cross_entropy``. GELU is the tanh
approximation (``jax.nn.gelu``'s default) and attention is written out (einsum, causal mask
with ``finfo.min``, softmax) exactly like ``gradience_jax.models.dot_product_attention``.

Example:
    The PyTorch steps need the ``[torch]`` extra, so the doctests skip them.

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from gradience_jax import data, heads, models
    >>> model = models.MLP([16, 8, 4], rngs=nnx.Rngs(0))
    >>> batch = data.classification(jax.random.key(0), n=32)
    >>> adapted = models.from_nnx(model, heads.softmax_cross_entropy())
    >>> tm = to_torch(model)  # doctest: +SKIP
    >>> x, y = tm.batch(batch)  # doctest: +SKIP
    >>> loss = tm.criterion()(tm.module(x), y)  # doctest: +SKIP
    >>> bool(abs(loss.item() - adapted.loss_fn(adapted.params, batch)) < 1e-5)  # doctest: +SKIP
    True
    >>> v = jax.tree_util.tree_map(jnp.ones_like, adapted.params)
    >>> hv_torch = tm.products(batch).hvp_func(tm.to_torch(v))  # doctest: +SKIP
    >>> hv = tm.from_torch(hv_torch)  # back in the Flax layout  # doctest: +SKIP
"""

from gradience_jax.torch_bridge._optional import torch_available
from gradience_jax.torch_bridge.layout import LeafMap
from gradience_jax.torch_bridge.model import TorchModel
from gradience_jax.torch_bridge.modules import to_torch, torch_cnn, torch_mlp, torch_transformer
from gradience_jax.torch_bridge.products import TorchProducts, compare_trees

__all__ = [
    "TorchModel",
    "TorchProducts",
    "LeafMap",
    "compare_trees",
    "torch_available",
    "to_torch",
    "torch_cnn",
    "torch_mlp",
    "torch_transformer",
]
