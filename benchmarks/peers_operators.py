"""Curvature products: gradience_jax vs PyTorch (double backprop, torch.func, curvlinops,
BackPACK) on the same MLP, CNN and transformer with identical weights and batch.

Usage:
    python benchmarks/peers_operators.py [--quick] [--out benchmarks/results/peers_operators.json]

Products (one call = everything from the params and batch, nothing cached, unless marked
"amortised"):
    grad                 reference cost (jax.grad vs torch.autograd.grad, torch.func.grad)
    HVP                  ours: jvp over grad (jitted); torch: double backprop ("autograd"
                         column), torch.func
                         jvp(grad) (fwd-over-rev), curvlinops HessianLinearOperator,
                         BackPACK hessianfree hessian_vector_product (double backprop)
    HVP (amortised)      ours: gradient linearised once, per product inside one compiled
                         scan of 10 products; torch: one retained create_graph gradient
                         (PyHessian's scheme), per product
    GGN-vp               ours: jvp -> analytic CE Hessian -> vjp; torch.func jvp/vjp;
                         curvlinops GGNLinearOperator; BackPACK hessianfree ggn_vector_product
    EF-vp                ours: streaming (jvp + vjp of the per-example losses);
                         torch.func vmap(grad) + contraction; curvlinops EFLinearOperator
    per-example grads    ours: vmap(grad); torch.func vmap(grad); BackPACK BatchGrad;
                         Python loop over examples (torch autograd, and our jitted grad)

Cells show ``ms (ratio)`` with ratio = peer time / our time (> 1: ours is faster). Times are
medians of repeated runs after warm-up; jax compile time is excluded (reported separately
for ours). Targets (DESIGN.md s.6): HVP <= 2.0 x grad; HVP >= 2 x faster than torch double
backprop; per-example gradients >= 10 x faster than a per-example Python loop.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

import gradience_jax as gj  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks.peers import NOT_APPLICABLE, NOT_INSTALLED  # noqa: E402
from gradience_jax.operators.base import apply  # noqa: E402

PRODUCTS = ("grad", "HVP", "HVP (amortised)", "GGN-vp", "EF-vp", "per-example grads")
IMPLS = ("autograd", "torch.func", "curvlinops", "BackPACK", "Python loop (torch)",
         "Python loop (ours)")


def ours_timings(adapted, batch, repeats: int) -> dict[str, float]:
    loss_fn, model_fn, params, head = adapted
    v = gj.tree.random_like(jax.random.key(1), params)
    out = {}
    grad = jax.jit(jax.grad(loss_fn))
    out["grad"] = peers.median_time(lambda: grad(params, batch), repeats, block=True)
    ops = {
        "HVP": gj.hessian(loss_fn, params, batch, linearize=False),
        "GGN-vp": gj.ggn(model_fn, head, params, batch, linearize=False),
        "EF-vp": gj.empirical_fisher(loss_fn, params, batch, mode="streaming", linearize=False),
    }
    for label, op in ops.items():
        out[label] = peers.median_time(lambda op=op: apply(op, v), repeats, block=True)
    lin = gj.hessian(loss_fn, params, batch, linearize=True)

    @jax.jit
    def ten_products(op, v):
        mv = op.bind()
        return jax.lax.fori_loop(0, 10, lambda i, x: mv(x), v)

    out["HVP (amortised)"] = peers.median_time(lambda: ten_products(lin, v),
                                               max(2, repeats // 2), block=True) / 10
    # op.linearized(): linearised once at this point, each standalone product is tangent work
    lin_op = gj.hessian(loss_fn, params, batch).linearized()
    out["HVP (linearized())"] = peers.median_time(lambda: apply(lin_op, v), repeats, block=True)
    peg = jax.jit(gj.per_example_grads, static_argnums=0)
    out["per-example grads"] = peers.median_time(lambda: peg(loss_fn, params, batch), repeats,
                                                 block=True)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    examples = [jax.tree_util.tree_map(lambda x: x[i:i + 1], batch) for i in range(n)]

    def loop():
        return [grad(params, ex) for ex in examples]

    out["per-example loop (ours)"] = peers.median_time(loop, max(2, repeats // 3), warmup=1,
                                                       block=True)
    return out


def torch_timings(model, adapted, batch, repeats: int) -> dict[str, dict[str, float | str]]:
    """``{product: {impl: seconds or "not installed" / "n/a"}}``."""
    torch = peers.peer("torch")
    table: dict[str, dict] = {p: {} for p in PRODUCTS}
    if torch is None:
        for p in PRODUCTS:
            table[p] = {i: NOT_INSTALLED for i in IMPLS if i != "Python loop (ours)"}
        return table
    from gradience_jax import torch_bridge as tb

    tm = tb.to_torch(model, adapted.params)
    prods = tm.products(batch, adapted.head)
    v = gj.tree.random_like(jax.random.key(1), adapted.params)
    vt = tm.to_torch(v)
    x, y = tm.batch(batch)
    crit = tm.criterion()
    params = tm.parameters

    def tgrad():
        return torch.autograd.grad(crit(tm.module(x), y), params)

    t = lambda fn, r=repeats, w=2: peers.median_time(fn, r, warmup=w)  # noqa: E731
    table["grad"]["autograd"] = t(tgrad)  # plain autograd: the reference
    table["grad"]["torch.func"] = t(prods.grad)
    table["HVP"]["autograd"] = t(lambda: prods.hvp_double_backprop(vt))
    table["HVP"]["torch.func"] = t(lambda: prods.hvp_func(vt))
    table["HVP (amortised)"]["autograd"] = t(lambda: prods.hvp_retained(vt))
    table["GGN-vp"]["torch.func"] = t(lambda: prods.ggn_func(vt))
    table["EF-vp"]["torch.func"] = t(lambda: prods.ef_func(vt))
    table["per-example grads"]["torch.func"] = t(prods.per_example_func)
    table["per-example grads"]["Python loop (torch)"] = t(prods.per_example_loop,
                                                          max(2, repeats // 3), 1)

    cl = peers.peer("curvlinops")
    if cl is None:
        for p in ("HVP", "GGN-vp", "EF-vp"):
            table[p]["curvlinops"] = NOT_INSTALLED
    else:
        data = [(x, y)]
        kw = dict(check_deterministic=False, num_data=int(x.shape[0]))
        ops = {"HVP": cl.HessianLinearOperator, "GGN-vp": cl.GGNLinearOperator,
               "EF-vp": cl.EFLinearOperator}
        for p, cls in ops.items():
            if p == "EF-vp" and tm.kind == "transformer":
                table[p]["curvlinops"] = "n/a (per-token EF)"
                continue
            op = cls(tm.module, crit, params, data, **kw)
            table[p]["curvlinops"] = t(lambda op=op: op @ vt)

    bp = peers.peer("backpack")
    if bp is None:
        for p in ("HVP", "GGN-vp", "per-example grads"):
            table[p]["BackPACK"] = NOT_INSTALLED
    else:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
        from backpack.hessianfree.hvp import hessian_vector_product

        def bp_hvp():
            loss = crit(tm.module(x), y)
            return hessian_vector_product(loss, params, vt)

        def bp_ggn():
            out = tm.module(x)
            return ggn_vector_product_from_plist(crit(out, y), out, params, vt)

        table["HVP"]["BackPACK"] = t(bp_hvp)
        table["GGN-vp"]["BackPACK"] = t(bp_ggn)
        if tm.kind == "transformer":
            table["per-example grads"]["BackPACK"] = "n/a (LayerNorm, attention)"
        else:
            from backpack.extensions import BatchGrad

            module = bp.extend(copy.deepcopy(tm.module))
            bcrit = bp.extend(tm.criterion())
            bparams = list(module.parameters())

            def batch_grad():
                for p in bparams:
                    p.grad = None
                loss = bcrit(module(x), y)
                with bp.backpack(BatchGrad()):
                    loss.backward()
                return [p.grad_batch for p in bparams]

            table["per-example grads"]["BackPACK"] = t(batch_grad)
    return table


def run(quick: bool) -> dict:
    repeats = 3 if quick else 7
    rows, long = [], []
    checks = {}
    for name in ("mlp", "cnn", "transformer"):
        model, adapted, batch = peers.build(name, quick)
        print(f"{name} ({peers.describe(adapted, batch)}): timing ours ...", flush=True)
        ours = ours_timings(adapted, batch, repeats)
        print(f"  ours: { {k: round(1e3 * v, 3) for k, v in ours.items()} } ms; timing torch ...",
              flush=True)
        theirs = torch_timings(model, adapted, batch, repeats)
        theirs["per-example grads"]["Python loop (ours)"] = ours["per-example loop (ours)"]
        for product in PRODUCTS:
            o = ours[product]
            row = {"model": name, "size": peers.describe(adapted, batch), "product": product,
                   "ours": peers.cell(1e3 * o)}
            for impl in IMPLS:
                val = theirs[product].get(impl, NOT_APPLICABLE)
                if isinstance(val, float):
                    row[impl] = peers.cell(1e3 * val, val / o)
                    long.append({"model": name, "product": product, "impl": impl,
                                 "ms": 1e3 * val, "ours_ms": 1e3 * o, "ratio": val / o})
                else:
                    row[impl] = val
                    long.append({"model": name, "product": product, "impl": impl, "ms": val,
                                 "ours_ms": 1e3 * o, "ratio": None})
            rows.append(row)
        db = theirs["HVP"].get("autograd")
        checks[name] = {
            "hvp_over_grad": ours["HVP"] / ours["grad"],
            "hvp_le_2x_grad": ours["HVP"] / ours["grad"] <= 2.0,
            "hvp_speedup_vs_double_backprop": db / ours["HVP"] if isinstance(db, float) else None,
            "hvp_ge_2x_faster_than_double_backprop":
                (db / ours["HVP"] >= 2.0) if isinstance(db, float) else None,
            "linearized_hvp_over_grad": ours["HVP (linearized())"] / ours["grad"],
            "linearized_hvp_le_1.4x_grad": ours["HVP (linearized())"] / ours["grad"] <= 1.4,
            "linearized_hvp_speedup_vs_double_backprop":
                db / ours["HVP (linearized())"] if isinstance(db, float) else None,
            "linearized_hvp_ge_2x_faster_than_double_backprop":
                (db / ours["HVP (linearized())"] >= 2.0) if isinstance(db, float) else None,
            "per_example_speedup_vs_loop_ours":
                ours["per-example loop (ours)"] / ours["per-example grads"],
            "per_example_ge_10x_vs_loop":
                ours["per-example loop (ours)"] / ours["per-example grads"] >= 10.0,
        }
        loop_t = theirs["per-example grads"].get("Python loop (torch)")
        if isinstance(loop_t, float):
            checks[name]["per_example_speedup_vs_loop_torch"] = loop_t / ours["per-example grads"]
    target_rows = [
        {"model": m, "HVP / grad (ours)": c["hvp_over_grad"], "<= 2.0": c["hvp_le_2x_grad"],
         "double backprop / ours HVP": c["hvp_speedup_vs_double_backprop"] or NOT_INSTALLED,
         ">= 2x": c["hvp_ge_2x_faster_than_double_backprop"]
         if c["hvp_ge_2x_faster_than_double_backprop"] is not None else NOT_INSTALLED,
         "loop / vmap per-example (ours)": c["per_example_speedup_vs_loop_ours"],
         ">= 10x": c["per_example_ge_10x_vs_loop"]}
        for m, c in checks.items()
    ]
    return {"rows": rows, "long": long, "targets": checks, "target_rows": target_rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches, fewer repeats")
    parser.add_argument("--out", default=str(peers.RESULTS_DIR / "peers_operators.json"))
    args = parser.parse_args(argv)
    info = peers.machine()
    res = run(args.quick)
    info["loadavg_end"] = peers.machine()["loadavg"]
    cols = ["model", "size", "product", "ours", *IMPLS]
    peers.print_table("Curvature products: median ms (peer / ours)", res["rows"], cols)
    peers.print_table("Targets (DESIGN.md s.6)", res["target_rows"])
    result = {"suite": "peers_operators", "quick": args.quick, "machine": info,
              "columns": cols, **res}
    peers.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
