"""Run every benchmark suite and write ``benchmarks/RESULTS.md`` from their JSON.

Usage:
    python benchmarks/run_all.py --quick            # everything small (a few minutes)
    python benchmarks/run_all.py                    # full sizes (GPT-2 scale still --small)
    python benchmarks/run_all.py --full-scale       # also the full GPT-2-small-shaped run
    python benchmarks/run_all.py --only peers_eigen,peers_trace
    python benchmarks/run_all.py --report-only      # re-render RESULTS.md from the JSON

Suites (each a script that prints its tables and writes JSON to ``benchmarks/results/``):
``operators`` (ours only: HVP / GGN / EF cost and XLA memory), ``lanczos`` (eigsh overhead
over bare HVPs), ``eigsh_clustered`` (the clustered top-10 case against ARPACK on the same
HVP, matfree, curvlinops + ARPACK and PyHessian; Lanczos memory), ``peers_operators``, ``peers_eigen``, ``peers_trace``,
``peers_memory``, ``scale_gpt2`` and ``influence`` (every ``gj.influence`` method and TracIn
against the exact inverse, kronfluence's EK-FAC as the PyTorch peer). Each runs in its own
process; a failing suite is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SUITES = ("operators", "lanczos", "eigsh_clustered", "peers_operators", "peers_eigen",
          "peers_trace", "peers_memory", "scale_gpt2", "influence")


def suite_command(name: str, quick: bool, full_scale: bool, results: Path) -> list[str]:
    if name == "scale_gpt2":
        out = results / ("scale_gpt2.json" if full_scale else "scale_gpt2_small.json")
        cmd = [sys.executable, str(HERE / "scale_gpt2.py"), "--out", str(out)]
        return cmd if full_scale else cmd + ["--small"]
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(results / f"{name}.json")]
    return cmd + (["--quick"] if quick else [])


def run_suites(names, quick: bool, full_scale: bool, results: Path) -> dict[str, dict]:
    status = {}
    for name in names:
        cmd = suite_command(name, quick, full_scale, results)
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE.parent)
        status[name] = {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0}
        print(f"=== {name}: exit {proc.returncode} in {status[name]['wall_s']:.0f} s", flush=True)
    return status


# -- RESULTS.md ----------------------------------------------------------------------------


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _machine_line(m: dict | None) -> str:
    if not m:
        return ""
    load = m.get("loadavg")
    end = m.get("loadavg_end")
    s = f"run {m.get('date', '?')}, load average {load[0]:.1f}" if load else f"run {m.get('date')}"
    if end:
        s += f" -> {end[0]:.1f}"
    return f"_{s} ({m.get('cpu_count')} CPUs)._\n\n"


def _verdict(ok) -> str:
    if ok is None:
        return "not measured"
    return "met" if ok else "MISSED"


def summary(docs: dict) -> list[dict]:
    """One row per performance target, from the suites' ``targets``."""
    rows = []
    d = docs.get("peers_operators")
    if d:
        for model, c in d["targets"].items():
            rows.append({"target": "HVP time <= 2.0 x gradient time", "case": model,
                         "measured": f"{c['hvp_over_grad']:.2f}x",
                         "verdict": _verdict(c["hvp_le_2x_grad"])})
        for model, c in d["targets"].items():
            s = c["hvp_speedup_vs_double_backprop"]
            rows.append({"target": "HVP >= 2x faster than torch double backprop", "case": model,
                         "measured": f"{s:.1f}x" if s else "torch not installed",
                         "verdict": _verdict(c["hvp_ge_2x_faster_than_double_backprop"])})
        for model, c in d["targets"].items():
            rows.append({"target": "per-example grads >= 10x faster than a Python loop",
                         "case": model,
                         "measured": f"{c['per_example_speedup_vs_loop_ours']:.1f}x vs loop of our "
                                     "jitted grad" + (
                                         f", {c['per_example_speedup_vs_loop_torch']:.0f}x vs "
                                         "torch loop" if "per_example_speedup_vs_loop_torch" in c
                                         else ""),
                         "verdict": _verdict(c["per_example_ge_10x_vs_loop"])})
    d = docs.get("peers_eigen")
    if d:
        r = {row["method"]: row for row in d["rows"]}
        ours = r.get("gradience_jax eigsh (Lanczos)", {})
        meas = []
        for name in ("PyHessian (power iteration + deflation)", "curvlinops + scipy eigsh (ARPACK)"):
            p = r.get(name, {})
            if isinstance(p.get("matvecs"), (int, float)):
                meas.append(f"{name.split(' ')[0]}: {p['matvecs']} vs {ours.get('matvecs')} "
                            f"matvecs, {p['wall s']:.2f} vs {ours.get('wall s', 0):.2f} s")
        rows.append({"target": "top-10 eigenvalues: fewer matvecs than PyHessian / curvlinops",
                     "case": f"MLP P={d['n_params']:,}", "measured": "; ".join(meas),
                     "verdict": _verdict(d["targets"]["fewer_matvecs_than_pyhessian_and_curvlinops"])})
        rows.append({"target": "top-10 eigenvalues: less wall time than PyHessian / curvlinops",
                     "case": f"MLP P={d['n_params']:,}", "measured": "see above",
                     "verdict": _verdict(d["targets"]["less_time_than_pyhessian_and_curvlinops"])})
    d = docs.get("peers_memory")
    if d:
        t = d["targets"]
        rows.append({"target": "GGN-vp temp memory <= gradient's (V=32k)", "case": "XLA temp",
                     "measured": ", ".join(
                         f"B*T={r['B*T']}: {r.get('xla_temp_MiB', float('nan')):.0f} vs "
                         f"{g.get('xla_temp_MiB', float('nan')):.0f} MiB"
                         for r, g in zip(d["results"].get("ours GGN-vp", []),
                                         d["results"].get("ours grad", []))),
                     "verdict": _verdict(t.get("ggn_temp_le_grad_temp"))})
        ops_mem = (docs.get("operators") or {}).get("memory") or []
        if len(ops_mem) >= 2:  # operators.py goes to B*T = 8192
            a, b = ops_mem[0], ops_mem[-1]
            growth = b["ggn_chunk512_temp_MiB"] / a["ggn_chunk512_temp_MiB"]
            rows.append({"target": "GGN-vp with vocab_chunk: memory flat in B*T",
                         "case": "XLA temp, operators.py",
                         "measured": f"{a['ggn_chunk512_temp_MiB']:.0f} -> "
                                     f"{b['ggn_chunk512_temp_MiB']:.0f} MiB for B*T {a['B*T']} -> "
                                     f"{b['B*T']} ({growth:.2f}x; unchunked "
                                     f"{b['ggn_temp_MiB'] / a['ggn_temp_MiB']:.1f}x)",
                         "verdict": _verdict(growth <= 1.25)})
        else:
            rows.append({"target": "GGN-vp with vocab_chunk: memory flat in B*T",
                         "case": "XLA temp",
                         "measured": ", ".join(
                             f"{r.get('xla_temp_MiB', float('nan')):.0f}"
                             for r in d["results"].get("ours GGN-vp vocab_chunk=512", [])) + " MiB",
                         "verdict": _verdict(t.get("chunked_ggn_temp_flat_in_BT"))})
    d = docs.get("lanczos")
    if d and d.get("overhead"):
        big = [r for r in d["overhead"] if r["n_params"] >= 1_000_000 * 0.9 and r["reorth"] == "window"]
        for r in big:
            rows.append({"target": "Lanczos (window) <= 1.15 x iterations x HVP time",
                         "case": f"P={r['n_params']:,}, {r['iterations']} iterations",
                         "measured": f"{r['ratio_vs_hvp']:.2f}x standalone HVPs "
                                     f"({r['ratio_vs_scan_hvp']:.2f}x HVPs in a compiled scan)",
                         "verdict": _verdict(r["ratio_vs_hvp"] <= 1.15)})
    d = docs.get("peers_eigen_anchor")
    if d and "time_vs_curvlinops" in d["targets"]:
        rows.append({"target": "top-10 to 1e-4: >= 5x less wall time than curvlinops + ARPACK",
                     "case": f"MLP {'-'.join(map(str, d['sizes']))}, B={d['batch']}",
                     "measured": f"{d['targets']['time_vs_curvlinops']:.2f}x (full reorth)"
                                 + (f", {d['targets']['time_vs_curvlinops_window']:.2f}x (window)"
                                    if "time_vs_curvlinops_window" in d["targets"] else ""),
                     "verdict": _verdict(d["targets"]["ge_5x_less_time_than_curvlinops"])})
    d = docs.get("eigsh_clustered")
    if d and not d.get("quick"):
        t = d["targets"]
        case = f"MLP {'-'.join(map(str, d['sizes']))} tanh, clustered top-10"
        for label, value, met in (
                ("converged with eigsh's defaults", "", t.get("converged_by_default")),
                ("<= 1.1x ARPACK's matvecs at equal accuracy",
                 f"{t.get('matvecs_vs_arpack_equal_accuracy', float('nan')):.2f}x",
                 t.get("matvecs_le_1.1x_arpack")),
                (">= 1.25x faster than ARPACK on the same jitted HVP (warm)",
                 f"{t.get('warm_speedup_vs_arpack_equal_accuracy', float('nan')):.2f}x",
                 t.get("warm_ge_1.25x_faster_than_arpack")),
                ("first call no slower than ARPACK's first call",
                 f"{t.get('first_call_defaults_vs_arpack_default', float('nan')):.2f}x",
                 t.get("first_call_no_slower_than_arpack")),
                (">= 5x faster than curvlinops + ARPACK",
                 f"{t.get('speedup_vs_curvlinops_arpack', float('nan')):.2f}x",
                 t.get("ge_5x_faster_than_curvlinops_arpack"))):
            rows.append({"target": label, "case": case, "measured": value,
                         "verdict": _verdict(met)})
        for r in d.get("memory", []):
            if r["target"] is not None:
                rows.append({"target": f"Lanczos state <= {r['target']} vectors ({r['reorth']})",
                             "case": f"P={r['n_params']:,}, XLA temporaries beyond the HVP's",
                             "measured": f"{r['extra_vectors_xla']:.1f} (peak RSS delta "
                                         f"{r['peak_rss_delta_vectors']:.1f})",
                             "verdict": _verdict(r["met"])})
    d = docs.get("influence")
    if d:
        for model, c in d.get("targets", {}).items():
            m = c.get("exact_lambda_min_plus_damping_min")
            rows.append({"target": "influence: damping='auto' keeps H + d I positive definite",
                         "case": model, "measured": "exact lambda_min + d >= " + (
                             f"{m:.3g}" if m is not None else "?"),
                         "verdict": _verdict(c.get("auto_damping_positive_definite"))})
            pc = c.get("cg_pearson_vs_exact")
            rows.append({"target": "influence: CG scores = exact inverse (Pearson >= 0.999)",
                         "case": model, "measured": f"{pc:.6f}" if pc is not None else "",
                         "verdict": _verdict(c.get("cg_matches_exact_pearson_ge_0.999")
                                             if pc is not None else None)})
    for key in ("scale_gpt2", "scale_gpt2_small"):
        d = docs.get(key)
        if d:
            case = "full size" if key == "scale_gpt2" else "--small (scaled down)"
            rows.append({"target": "GPT-2-small scale: < 10 min", "case": case,
                         "measured": f"{d['total_wall_s']:.0f} s",
                         "verdict": _verdict(d["targets"]["total_lt_10_min"])})
            rows.append({"target": "GPT-2-small scale: peak <= 8 GB", "case": case,
                         "measured": f"{d['peak_rss_GiB']:.2f} GiB",
                         "verdict": _verdict(d["targets"]["peak_le_8_GB"])})
    if not docs.get("scale_gpt2"):
        rows.append({"target": "GPT-2-small scale: < 10 min, peak <= 8 GB", "case": "full size",
                     "measured": "not run at full size (see notes)", "verdict": "not measured"})
    return rows


def render(results: Path) -> str:
    from benchmarks.peers import markdown_table

    docs = {n: _load(results, n) for n in SUITES}
    docs["scale_gpt2_small"] = _load(results, "scale_gpt2_small")
    docs["peers_eigen_anchor"] = _load(results, "peers_eigen_anchor")
    machine = next((docs[n]["machine"] for n in ("peers_operators", "peers_eigen", "peers_trace",
                                                  "peers_memory", "scale_gpt2", "scale_gpt2_small")
                    if docs.get(n) and "versions" in docs[n].get("machine", {})), {})
    v = machine.get("versions", {})
    out = ["# Benchmark results\n",
           "Generated by `python benchmarks/run_all.py` from the JSON in `benchmarks/results/`. "
           "Both frameworks are timed in the same process run (medians after warm-up; jax "
           "compile time excluded unless marked); ratios are what to compare on a shared "
           "machine. PyTorch runs with `torch.set_num_threads(2)`, jax with its defaults.\n",
           "## Machine and versions\n",
           f"- machine: {machine.get('cpu_model', machine.get('processor', '?'))}, "
           f"{machine.get('cpu_count')} CPUs, {machine.get('mem_total_GiB', '?')} GiB RAM, "
           f"{machine.get('platform', '?')}",
           f"- date: {machine.get('date', '?')}; load average at start "
           f"{machine.get('loadavg')} (other jobs were running on the machine)",
           "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n"]
    out += ["## Targets (DESIGN.md s.6 and issue 10) at a glance\n",
            markdown_table(summary(docs)),
            "\n(`missed` is reported as measured; see the sections below for the numbers.)\n"]
    d = docs["peers_operators"]
    if d:
        out += ["## Curvature products vs PyTorch (`peers_operators.py`" +
                (" --quick" if d.get("quick") else "") + ")\n",
                _machine_line(d.get("machine")),
                "Median ms per call; `(r x)` = peer time / our time (> 1: ours is faster). "
                "`autograd` is `torch.autograd` (double backprop for HVP); HVP (amortised) = "
                "ours linearised once, per product in a compiled loop vs torch with one "
                "retained `create_graph` gradient (PyHessian's scheme).\n",
                markdown_table(d["rows"], d.get("columns")),
                "\nTargets (DESIGN.md s.6):\n", markdown_table(d["target_rows"])]
    for d in (docs.get("peers_eigen_anchor"), docs["peers_eigen"]):
        if not d:
            continue
        out += [f"\n## Top-10 Hessian eigenvalues to {d['target_rel_error']:g} relative error "
                "(`peers_eigen.py`" + (" --quick" if d.get("quick") else "") + ")\n",
                _machine_line(d.get("machine")),
                f"MLP {d['sizes']}, P={d['n_params']:,}, B={d['batch']}, which={d['which']}. "
                "`setting` = the loosest tolerance (or Lanczos steps) that reached the target; "
                "wall time of a repeat run at that setting.\n",
                markdown_table(d["rows"]),
                f"\nTargets: {d['targets']}\n"]
    d = docs["peers_trace"]
    if d:
        dd = d["density"]
        out += ["\n## Trace and spectral density at equal matvec budgets (`peers_trace.py`" +
                (" --quick" if d.get("quick") else "") + ")\n",
                _machine_line(d.get("machine")),
                f"MLP {d['sizes']}, P={d['n_params']:,}, exact trace {d['exact_trace']:.5g}; "
                f"mean relative error over {d['repetitions']} seeds, median ms per estimate.\n",
                markdown_table(d["trace_rows"]),
                f"\nDensity: {dd['probes']} probes x {dd['steps']} Lanczos steps; L1 distance "
                f"of the broadened density (sigma {dd['sigma']:.3g}) to the exact one.\n",
                markdown_table(d["density_rows"]),
                f"\nChecks: {d['targets']}\n"]
    d = docs["peers_memory"]
    if d:
        out += [f"\n## Memory: GGN-vector products at V={d['vocab']} (`peers_memory.py`" +
                (" --quick" if d.get("quick") else "") + ")\n",
                _machine_line(d.get("machine")),
                "Peak RSS above the baseline during one product (MiB; sampled every 0.5 ms, "
                "each implementation in a fresh process) and, for ours, XLA "
                "`memory_analysis().temp_size_in_bytes`.\n",
                markdown_table(d["rows"], d.get("columns")),
                f"\nTargets: {d['targets']}\n"]
    for key, title in (("scale_gpt2", "GPT-2-small-shaped model"),
                       ("scale_gpt2_small", "scaled-down GPT-2 (`--small`)")):
        d = docs[key]
        if not d:
            continue
        rows = [{"phase": k, "wall s": p["wall_s"], "matvecs": p.get("matvecs", ""),
                 "eigenvalues": ", ".join(f"{e:.4g}" for e in p.get("eigenvalues", [])),
                 "converged": p.get("converged", ""),
                 "peak RSS during phase (GiB)": p["peak_rss_delta_GiB"]}
                for k, p in d["phases"].items()]
        out += [f"\n## Scale: {title} (`scale_gpt2.py`)\n", _machine_line(d.get("machine")),
                f"{d['config']}, P={d['n_params']:,}, B*T={d['batch'] * d['seq_len']}, "
                f"window {d['window']}, tol {d['tol']}: total {d['total_wall_s']:.0f} s, "
                f"process peak RSS {d['peak_rss_GiB']:.2f} GiB.\n",
                markdown_table(rows), f"\nTargets: {d['targets']}\n"]
    out += _influence_section(docs.get("influence"))
    out += _operators_section(docs.get("operators"))
    out += _lanczos_section(docs.get("lanczos"))
    out += _clustered_section(docs.get("eigsh_clustered"))
    out += ["\n## Notes\n", *[f"- {n}" for n in NOTES], ""]
    return "\n".join(out)


def _influence_section(d: dict | None) -> list[str]:
    """``influence.py``: time, memory and accuracy of every influence method; the peer."""
    from benchmarks.peers import markdown_table

    if not d:
        return []
    out = ["\n## Influence functions vs the exact inverse (`influence.py`"
           + (" --quick" if d.get("quick") else "") + ")\n", _machine_line(d.get("machine")),
           "Scores `-g_test^T (H + d I)^{-1} g_train` of every training on every test example "
           "(per-example cross-entropy gradients; `H` the Hessian of the trained objective "
           "with its L2 term), `damping='auto'` everywhere. Wall s: median of "
           f"{d.get('repeats')} call(s) after a first call (compile s = first call - median; "
           "`repeats` 0: a slow method timed by its first call alone); peak RSS above the RSS "
           "before the timed calls"
           + (", process peak = each method's fresh process above its setup"
              if d.get("isolated") else " (one process: indicative only)")
           + ". Accuracy against the exact inverse at the method's damping: Pearson / "
           "Spearman over the whole score matrix, mean per-test-row Spearman, overlap of "
           "the top-10 most harmful training examples, relative Frobenius error; TracIn is "
           "sign-flipped and has no relative error (another quantity). Max residual: the "
           "largest true `||(H + d I) x - g|| / ||g||` of the solves.\n"]
    for name, c in d.get("cases", {}).items():
        h, r = c.get("history", {}), c.get("reference", {})
        out.append(f"- {name}: {c.get('label')}; train / test loss {h.get('train_loss', 0):.3f}"
                   f" / {h.get('test_loss', 0):.3f}, accuracy {h.get('train_accuracy', 0):.2f}"
                   f" / {h.get('test_accuracy', 0):.2f}; reference: {r.get('kind')}, exact "
                   f"lambda in [{r.get('lambda_min', 0):.4g}, {r.get('lambda_max', 0):.4g}]"
                   + (f" ({r['n_negative_eigenvalues']} negative)"
                      if r.get("n_negative_eigenvalues") is not None else ""))
    out += ["", markdown_table(d["rows"], d.get("columns"))]
    if d.get("peer_rows"):
        out += ["\nPyTorch peer on the MLP, same data and weights, one run (kronfluence's "
                "true Fisher samples one label per example, ours is the exact type-2 Fisher; "
                "its sign is flipped to ours):\n", markdown_table(d["peer_rows"])]
    out.append(f"\nChecks: {d.get('targets')}\n")
    return out


def _operators_section(d: dict | None) -> list[str]:
    """``operators.py``: product times as ratios to the gradient, and XLA temp memory."""
    from benchmarks.peers import markdown_table

    if not d:
        return []
    load = d.get("load_average")
    rows = [{"model": r["model"], "P": f"{r['n_params']:,}", "grad ms": r["grad_ms"],
             "HVP / grad": r["hvp_ratio"], "HVP linearised / grad": r["hvp_linearized_ratio"],
             "HVP per product in a compiled loop / grad": r["hvp_linearized_per_product_ratio"],
             "GGN-vp / grad": r["ggn_ratio"], "EF-vp / grad": r["ef_streaming_ratio"]}
            for r in d["timing"]]
    mem = [{"B*T": r["B*T"], "grad MiB": r["grad_temp_MiB"], "HVP MiB": r["hvp_temp_MiB"],
            "GGN-vp MiB": r["ggn_temp_MiB"], "GGN-vp vocab_chunk=512 MiB": r["ggn_chunk512_temp_MiB"]}
           for r in d["memory"]]
    return ["\n## Operators vs the gradient (`operators.py`" + (" --quick" if d.get("quick")
                                                                 else "") + ")\n",
            f"_run {d.get('date')}, load average {load[0]:.1f}._\n\n" if load else "",
            "Median over 20 calls after warm-up, one call per product unless marked (the "
            "compiled loop is how Lanczos uses a linearised operator).\n",
            markdown_table(rows),
            "\nXLA temporary memory (`memory_analysis().temp_size_in_bytes`, deterministic) "
            "of one product, transformer LM with V=32768, d_model=64:\n",
            markdown_table(mem), f"\nTargets: {d.get('targets_met')}\n"]


def _lanczos_section(d: dict | None) -> list[str]:
    """``lanczos.py``: eigsh overhead over bare HVPs; time to 1e-4 vs ARPACK."""
    from benchmarks.peers import markdown_table

    if not d:
        return []
    out = ["\n## Lanczos overhead and accuracy (`lanczos.py`" + (" --quick" if d.get("quick")
                                                                  else "") + ")\n"]
    if d.get("overhead"):
        rows = [{"P": f"{r['n_params']:,}", "B": r["batch"], "iterations": r["iterations"],
                 "reorth": r["reorth"], "HVP ms": 1e3 * r["hvp_s"],
                 "HVP in a scan ms": 1e3 * r["hvp_in_scan_s"], "eigsh s (warm)": r["eigsh_warm_s"],
                 "eigsh / (iters x HVP)": r["ratio_vs_hvp"],
                 "eigsh / (iters x HVP in scan)": r["ratio_vs_scan_hvp"]}
                for r in d["overhead"]]
        out += ["Wall time of `eigsh(k=10, num_iters=m)` over m standalone HVPs, and over m "
                "HVPs inside a compiled scan (the stricter reference). Target: <= 1.15 at "
                ">= 1M parameters with window reorth.\n", markdown_table(rows)]
    a = d.get("accuracy")
    if a:
        rows = [{"method": f"ours, reorth={m}", "iterations": r["iterations"],
                 "matvecs": r["matvecs"], "wall s (warm)": r["warm_s"],
                 "wall s (with compile)": r["cold_s"], "max rel err": r["max_rel_error"]}
                for m, r in a["ours"].items()]
        for tol, r in a.get("scipy_arpack", {}).items():
            if tol == "reached":
                continue
            rows.append({"method": f"scipy ARPACK on our matvec, tol={tol}", "iterations": "",
                         "matvecs": r["matvecs"], "wall s (warm)": r["wall_s"],
                         "wall s (with compile)": "", "max rel err": r["max_rel_error"]})
        out += [f"\nTop-10 Hessian eigenvalues of an MLP (P={a['n_params']:,}, B={a['batch']}) "
                f"to {a['target_rel_error']:g} relative error:\n", markdown_table(rows)]
        for key, label in (("speedup_window_warm_vs_arpack", "compiled"),
                           ("speedup_window_cold_vs_arpack", "including our compile time")):
            if key in a:
                out.append(f"- ARPACK time / ours (window), {label}: {a[key]:.2f}x\n")
    return out


def _clustered_section(d: dict | None) -> list[str]:
    """``eigsh_clustered.py``: the clustered top-10 case, every method, and Lanczos memory."""
    from benchmarks.peers import markdown_table

    if not d:
        return []
    rows = [{"method": r["method"], "matvecs": r.get("matvecs", ""),
             "warm s": r.get("warm_s", ""), "first call s": r.get("first_call_s", ""),
             "compile s": r.get("compile_s", ""), "max rel err": r.get("max_rel_error", ""),
             "note": r.get("reached", "")} for r in d["rows"]]
    out = ["\n## Top-10 Hessian eigenvalues, clustered (`eigsh_clustered.py`"
           + (" --quick" if d.get("quick") else "") + ")\n", _machine_line(d.get("machine")),
           f"MLP {'-'.join(map(str, d['sizes']))} tanh at init, P={d['n_params']:,}, "
           f"B={d['batch']}; reference (float64 ARPACK) "
           f"{', '.join(f'{x:.4f}' for x in d['reference'])}. Equal accuracy: max relative "
           f"error <= {d['target_rel_error']:g}.\n", markdown_table(rows)]
    if d.get("memory"):
        out += ["\nLanczos memory of `eigsh(k=3, num_iters=30)`, parameter-sized float32 "
                "vectors beyond the HVP's own working set (XLA temporaries) and the peak RSS "
                "delta of a warm call:\n", markdown_table(d["memory"])]
    out.append(f"\nTargets: {d['targets']}\n")
    return out


NOTES = (
    "PyTorch runs with `torch.set_num_threads(2)` and `OMP_WAIT_POLICY=PASSIVE` (set by "
    "`benchmarks/peers.py` unless the environment sets it): with the default spin-waiting, "
    "2-thread torch on this shared, oversubscribed CPU was ~30x slower (424 ms vs 14 ms for "
    "one MLP gradient), which would have flattered us.",
    "curvlinops 3.0.1 forms HVPs as `torch.func.jvp(jacrev(loss))`; on torch 2.13 that "
    "composition returns wrong rows for LayerNorm scales (double backprop and "
    "`torch.func.jvp(grad(loss))` agree with us), so `tests/test_torch_agreement.py` compares "
    "curvlinops' transformer HVP without those rows. Its timings are unaffected.",
    "PyHessian's `density()` calls `torch.eig` (removed in torch 1.9); `peers_trace.py` "
    "installs a `torch.linalg.eigh` shim for the run. PyHessian's `trace()` stops early "
    "whenever its running mean is negative for any `tol >= 0`, so equal budgets use "
    "`tol=-inf`.",
    "hessian-eigenthings 1.0.0a5 has a new API (no `compute_hessian_eigenthings`): we use "
    "`HessianOperator` with `lanczos` (full reorthogonalisation) and "
    "`deflated_power_iteration`.",
    "BackPACK: per-example gradients by `BatchGrad` (MLP, CNN; its extensions do not cover "
    "LayerNorm / attention), HVP and GGN-vp by `backpack.hessianfree` (autograd R-op / L-op).",
    "The transformer's EF in curvlinops is per token (it flattens `(B*T, V)` outputs); ours "
    "is per sequence, so that cell is n/a.",
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes everywhere")
    p.add_argument("--full-scale", action="store_true", help="full GPT-2-small-shaped run")
    p.add_argument("--only", default=None, help="comma-separated suites")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--markdown", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        names = args.only.split(",") if args.only else SUITES
        unknown = sorted(set(names) - set(SUITES))
        if unknown:
            raise SystemExit(f"unknown suites {unknown}; choose from {SUITES}")
        status = run_suites(names, args.quick, args.full_scale, results)
        (results / "run_all_status.json").write_text(json.dumps(status, indent=2))
        failed = [n for n, s in status.items() if s["returncode"] != 0]
        if failed:
            print(f"\nfailed suites: {failed}")
    Path(args.markdown).write_text(render(results))
    print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
