"""Train the model of ``my_model.py`` and save its parameters with orbax.

    python examples/train_my_model.py runs/my_run

Minibatch Adam on the spirals of ``my_model.data()``, written the way an NNX training loop
is (``nnx.Optimizer``, an ``nnx.jit`` train step). Every ``--save-every`` steps (and at
step 0) an orbax ``CheckpointManager`` in RUN_DIR saves the ``nnx.Param`` state as the item
``params``, with the loss as a JSON item ``metrics``: one folder per step, which
``gradience-jax analyze --checkpoint RUN_DIR`` (its latest step) and ``gradience-jax track
RUN_DIR`` (every step) read. The run is deterministic (seeded init, data and shuffling).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from my_model import data, model


def loss_fn(net: nnx.Module, batch: dict) -> float:
    """Mean softmax cross-entropy of ``net`` on ``batch``.

    Args:
        net: the model.
        batch: ``{"inputs": x, "labels": y}``.

    Returns:
        The scalar loss.
    """
    logits = net(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


@nnx.jit
def train_step(net: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> float:
    """One Adam step on ``batch``, in place.

    Args:
        net: the model (updated).
        optimizer: its optimizer (updated).
        batch: a minibatch.

    Returns:
        The minibatch loss before the step.
    """
    loss, grads = nnx.value_and_grad(loss_fn)(net, batch)
    optimizer.update(net, grads)
    return loss


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1.

    Args:
        text: the flag's value.

    Returns:
        The integer.

    Raises:
        argparse.ArgumentTypeError: not an integer, or below 1.
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main() -> None:
    """Parse the command line, train, save the checkpoints."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the CheckpointManager directory (must not hold a run)")
    parser.add_argument("--steps", type=positive_int, default=400, help="training steps (400)")
    parser.add_argument("--save-every", type=positive_int, default=100,
                        help="checkpoint interval; the last step is saved too (100)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size (64)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (1e-2)")
    args = parser.parse_args()

    net = model()
    optimizer = nnx.Optimizer(net, optax.adam(args.lr), wrt=nnx.Param)
    full = data()
    if args.batch_size > len(full["labels"]):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(full['labels'])} "
                     "training points")
    rng = np.random.default_rng(1)
    order = rng.permutation(len(full["labels"]))
    batches_per_epoch = len(order) // args.batch_size
    with ocp.CheckpointManager(Path(args.run_dir).absolute()) as mngr:
        if mngr.all_steps():
            parser.error(f"{args.run_dir} already holds the checkpoints of steps "
                         f"{list(mngr.all_steps())}: pass a new RUN_DIR")
        for step in range(args.steps + 1):
            if step % args.save_every == 0 or step == args.steps:
                loss = float(loss_fn(net, full))
                mngr.save(step, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(nnx.state(net, nnx.Param)),
                    metrics=ocp.args.JsonSave({"loss": loss})))
                print(f"step {step:4d}  loss {loss:.4f}  saved")
            if step == args.steps:
                break
            i = step % batches_per_epoch
            if i == 0 and step:  # a new epoch: reshuffle
                order = rng.permutation(len(order))
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            train_step(net, optimizer, {k: v[idx] for k, v in full.items()})
        mngr.wait_until_finished()
        print(f"checkpoints {mngr.all_steps()} in {args.run_dir}")


if __name__ == "__main__":
    main()
