"""Block heterogeneity and the SGD–Adam gap, a small reproduction of Zhang et al., "Why Transformers Need Adam: A
Hessian Perspective" (NeurIPS 2024, arXiv 2402.16788).

For an MLP, a residual CNN, a ViT (all on the bundled digits) and a character GPT (on python_docs):

* JS₀ — the mean pairwise Jensen–Shannon distance between the diagonal Hessian blocks' spectral densities
  (``BlockSpectrumDensity``, each block's spectrum scaled by its spectral radius) — at initialisation and after a
  short training with Adam, over the seeds (mean ± std);
* the gap between SGD (momentum 0.9, the best of a small step-size grid) and Adam (the best of its grid) after an
  equal budget of samples (the same rounds of whole-model steps on the same batches: ``--training_mode entire``),
  as the final training loss of SGD minus Adam's, per seed at the two best step sizes (mean ± std).

The published claim: Transformers show a larger JS₀ than CNNs and MLPs, and a larger SGD–Adam gap. This prints what
the numbers show at this scale, with the machine, date and thread count, and writes the table (Markdown) and a
figure (gap against JS₀) to ``--out``.

    python bench/bench_heterogeneity.py                  # 3 seeds, the full grids (tens of minutes on 2 cores)
    python bench/bench_heterogeneity.py --quick          # one seed, one step size each (a smoke run)
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dol1  # noqa: E402
from src.plots import pyplot, save_figure  # noqa: E402

MODELS = {  # name -> the settings of its runs
    "mlp": {"model": "mlp", "config": [64, 64, 64], "dataset_name": "digits"},
    "residual_cnn": {"model": "residual_cnn", "config": [16, 32, 32], "dataset_name": "digits"},
    "vit": {"model": "vit", "config": [32, 32], "dataset_name": "digits"},
    "gpt": {"model": "gpt", "config": [32, 32], "dataset_name": "python_docs", "context": 32},
}
SGD_STEPS, ADAM_STEPS = [0.01, 0.03, 0.1], [0.0003, 0.001, 0.003]
UNITS = "- BlockSpectrumDensity probes={probes} lanczos_steps={steps} batch_size={batch} dtype={dtype}\n"


def run(out: Path, units: Path, rounds: int, seed: int, optimizer: str, step: float, settings: dict,
        measure: bool) -> dict:
    """One run; returns its last record (and the JS₀ records when ``measure``)."""
    frame = dol1.run(**settings, training_mode="entire", optimizer=optimizer, step_size=step, momentum=0.9,
                     seed=seed, rounds=rounds, batch_size=64, report_sampling_rate=rounds, eval_samples=512,
                     units_file=str(units), measurement_sampling_rate=0,
                     measurement_rounds=[0, rounds] if measure else None, checkpoint_every=0,
                     output_root=str(out), tag=f"bench-{optimizer}-{step}")
    result = {"loss": frame.history[-1]["loss"], "test_loss": frame.history[-1]["test_loss"]}
    if measure:
        log = frame.paths.measurements / f"BlockSpectrumDensity_{frame.run_id}.jsonl"
        records = {r["round"]: r for r in map(json.loads, log.read_text().splitlines())}
        result.update(js0_init=records[0]["js0"], js0_trained=records[rounds]["js0"],
                      floor_init=records[0].get("js0_floor"), floor_trained=records[rounds].get("js0_floor"))
    return result


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3g}" + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=100, help="whole-model steps per run (equal budget)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--lanczos_steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128, help="samples (sequences for gpt) per density measurement")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                        help="of the density measurement (float32: ~3x faster convolutions on CPU)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="one seed, one step size per optimiser, few rounds")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_heterogeneity"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sgd, adam = (SGD_STEPS, ADAM_STEPS) if not args.quick else ([0.03], [0.001])
    seeds, rounds = (args.seeds, args.rounds) if not args.quick else (args.seeds[:1], min(args.rounds, 6))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    units = out / "units.txt"
    units.write_text(UNITS.format(probes=args.probes if not args.quick else 2,
                                  steps=args.lanczos_steps if not args.quick else 5, batch=args.batch, dtype=args.dtype))
    empty = out / "none.txt"
    empty.write_text("# none\n")
    started, rows = time.perf_counter(), []
    for name in args.models:
        settings, results = MODELS[name], {}
        for optimizer, steps in (("sgd", sgd), ("adam", adam)):
            for step in steps:
                results[(optimizer, step)] = [
                    run(out, units if optimizer == "adam" and step == adam[len(adam) // 2] else empty, rounds,
                        seed, optimizer, step, settings, measure=optimizer == "adam" and step == adam[len(adam) // 2])
                    for seed in seeds]
        best = {opt: min((s for o, s in results if o == opt),
                         key=lambda s, opt=opt: statistics.fmean(r["loss"] for r in results[(opt, s)]))
                for opt in ("sgd", "adam")}
        measured = results[("adam", adam[len(adam) // 2])]
        gaps = [a["loss"] - b["loss"] for a, b in zip(results[("sgd", best["sgd"])], results[("adam", best["adam"])])]
        rows.append({"model": name, "js0_init": [r["js0_init"] for r in measured],
                     "floor_init": [r["floor_init"] for r in measured],
                     "js0_trained": [r["js0_trained"] for r in measured], "sgd_step": best["sgd"],
                     "adam_step": best["adam"], "sgd_loss": [r["loss"] for r in results[("sgd", best["sgd"])]],
                     "adam_loss": [r["loss"] for r in results[("adam", best["adam"])]], "gap": gaps})
    stamp = (f"{datetime.date.today()}, {platform.node()} ({platform.machine()}, {torch.get_num_threads()} torch "
             f"threads), torch {torch.__version__}, {len(seeds)} seed(s), {rounds} whole-model steps of 64 samples "
             f"per run, density: {args.probes} probes x {args.lanczos_steps} Lanczos steps on {args.batch} samples in "
             f"{args.dtype}, {time.perf_counter() - started:.0f} s")
    header = ("| model | JS₀ at init | its noise floor | JS₀ after training (Adam) | best SGD step | best Adam step "
              "| SGD final loss | Adam final loss | gap SGD − Adam |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lines.append(f"| {row['model']} | {mean_std(row['js0_init'])} | {mean_std(row['floor_init'])} | "
                     f"{mean_std(row['js0_trained'])} | "
                     f"{row['sgd_step']:g} | {row['adam_step']:g} | {mean_std(row['sgd_loss'])} | "
                     f"{mean_std(row['adam_loss'])} | {mean_std(row['gap'])} |")
    table = "\n".join(lines)
    print(stamp)
    print(table)
    (out / "heterogeneity.md").write_text(f"{stamp}\n\n{table}\n")
    (out / "heterogeneity.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=1))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for row in rows:
        x, y = statistics.fmean(row["js0_init"]), statistics.fmean(row["gap"])
        ax.errorbar(x, y, xerr=statistics.stdev(row["js0_init"]) if len(row["js0_init"]) > 1 else None,
                    yerr=statistics.stdev(row["gap"]) if len(row["gap"]) > 1 else None, fmt="o", capsize=3)
        ax.annotate(row["model"], (x, y), textcoords="offset points", xytext=(5, 5))
    ax.margins(0.2)  # room for the model names beside the outermost points
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(xlabel="JS$_0$ at initialisation (mean ± std over seeds)",
           ylabel="final training loss, SGD − Adam", title="block heterogeneity and the SGD–Adam gap")
    ax.grid(alpha=0.3)
    for path in save_figure(fig, out / "heterogeneity"):
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
