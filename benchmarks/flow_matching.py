"""eps, v or flow? One U-Net and one training budget (lesson 02's default run) with each target, sampled at few calls.

    python benchmarks/flow_matching.py

For each of --targets, lesson 02's default run with --prediction TARGET (trained into --runs/TARGET unless a finished
checkpoint is there already; about 25-50 min each on 2 cores), then, from the same 1000 starting noises:
  - FD minus the real-data floor (utils.metrics, at the same count) at each of --calls network calls, for DDIM
    (eta 0; Euler on the flow ODE is the same update, tests/test_flow_matching.py), DPM-Solver++(2M) and Heun;
  - DDPM-1000 (lesson 02's sampler, 1000 calls) on the first --ddpm-samples of the noises (256: 1000 calls per image);
  - straightness: how far the one-call answer (x0_pred at t = T - 1, one Euler step) lies from where the path ends
    after 200 Euler steps, RMS per pixel on 256 noises (images span [-1, 1]; 0 for a straight path).
Writes benchmarks/results/flow_matching_TAG.md and .csv (one row per target, sampler and call count) and
flow_matching_TAG.png (FD - floor against network calls). The question it answers: does flow with Euler or Heun
beat v with DPM-Solver++ at 8-10 calls here?
"""
import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, load_lesson
from utils import metrics
from utils.runtime import SAMPLE_BATCH_SIZE, pick_device, positive_int

lesson02 = load_lesson("02_ddpm.py")
lesson04 = load_lesson("04_ddim_fast_sampling.py")
compare = load_lesson("examples/compare_methods.py")
SAMPLERS = ("ddim", "dpm-solver++", "heun")
METRICS_CACHE = ROOT / "outputs" / "metrics"  # utils.metrics' classifier and real-data features, as the lessons cache them
FIELDS = ("target", "sampler", "calls", "steps", "samples", "fd", "floor", "fd_minus_floor", "seconds_per_image")


def targets(text):
    """argparse type: 'eps,v,flow' -> ('eps', 'v', 'flow')."""
    names = tuple(part.strip() for part in text.split(","))
    if not names or any(name not in lesson04.PREDICTIONS for name in names):
        raise argparse.ArgumentTypeError(f"targets are {', '.join(lesson04.PREDICTIONS)}, got {text!r}")
    return names


def trained_checkpoint(target, runs, extra, data_dir):
    """RUNS/target/checkpoint.pt, trained by lesson 02's default command (on data_dir, with the extra flags) when it
    is not there or not finished: (path, minutes of training in this invocation or None). SystemExit (one line) when
    the checkpoint there predicts another target or the training fails."""
    path = runs / target / "checkpoint.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["config"].get("prediction", "eps") != target:
            raise SystemExit(f"{path} predicts {saved['config'].get('prediction', 'eps')}, not {target}")
        if saved["step"] >= saved["config"]["total_steps"]:
            return path, None
    command = [sys.executable, str(ROOT / "02_ddpm.py"), "--prediction", target, "--out", str(runs / target),
               "--data-dir", str(data_dir), *extra]
    if path.exists():
        command.append("--resume")
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"lesson 02's run for {target} failed (its message is above): {' '.join(command)}")
    return path, (time.perf_counter() - started) / 60


def straightness(model, config, alpha_bars, noises, steps=200):
    """RMS per pixel between the one-call answer from noise (x0_pred at t = T - 1) and the end of a `steps`-step
    (at most T) Euler path from the same noise: 0 when the path the sampler follows is a straight line."""
    steps = min(steps, config["timesteps"])
    prediction = config.get("prediction", "eps")
    clip = lesson04.clip_for(prediction)
    one, _ = lesson04.sample(model, alpha_bars, noises, 1, "euler", prediction=prediction, clip_x0=clip)
    many, _ = lesson04.sample(model, alpha_bars, noises, steps, "euler", prediction=prediction, clip_x0=clip)
    return (one - many).pow(2).mean().sqrt().item()


def draw_figure(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    colours = {"eps": "tab:blue", "v": "tab:orange", "flow": "tab:green"}
    styles = {"ddim": "-", "dpm-solver++": "--", "heun": ":", "euler": "-."}
    for target in dict.fromkeys(row["target"] for row in rows):
        for sampler in dict.fromkeys(row["sampler"] for row in rows if row["sampler"] != "ddpm"):  # --samplers
            chosen = [row for row in rows if row["target"] == target and row["sampler"] == sampler]
            if chosen:
                axis.plot([row["calls"] for row in chosen], [row["fd_minus_floor"] for row in chosen],
                          styles[sampler], marker="o", color=colours[target],
                          label=f"{target}, {lesson04.SAMPLER_NAMES[sampler]}" + (" = Euler" if sampler == "ddim"
                                                                                  else ""))
        ddpm = [row for row in rows if row["target"] == target and row["sampler"] == "ddpm"]
        if ddpm:
            axis.axhline(ddpm[0]["fd_minus_floor"], color=colours[target], linewidth=0.8, alpha=0.6)
            axis.annotate(f"{target}, DDPM-1000", (1, ddpm[0]["fd_minus_floor"]), fontsize=7, color=colours[target],
                          va="bottom")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("network calls")
    axis.set_ylabel("FD - floor (lower is better)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=targets, default=("eps", "v", "flow"))
    parser.add_argument("--calls", type=compare.step_counts, default=(1, 2, 4, 8, 10, 20, 50))
    parser.add_argument("--samples", type=positive_int, default=1000, help="images per fast sampler and call count")
    parser.add_argument("--ddpm-samples", type=int, default=256, help="images for DDPM-1000 (0: skip it)")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "flow_matching",
                        help="folder of the three training runs (RUNS/eps, RUNS/v, RUNS/flow)")
    parser.add_argument("--train-args", default="", help="extra flags for lesson 02's runs (default: none, its defaults)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samplers", type=compare.sampler_names, default=SAMPLERS,
                        help="fast samplers, comma-separated (default ddim,dpm-solver++,heun)")
    parser.add_argument("--timestep-spacing", choices=lesson04.TIMESTEP_SPACINGS, default=None,
                        help="one spacing for every fast sampler (default: each sampler's own, lesson 04)")
    parser.add_argument("--no-straightness", action="store_true",
                        help="skip the straightness measure (200 Euler steps on 256 noises: about 2.5 min per target "
                             "on 2 CPU cores), when only the samplers are wanted")
    parser.add_argument("--results-tag", default="cpu")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    started = time.perf_counter()
    rows, straight, trained = [], {}, {}
    for target in args.targets:
        path, minutes = trained_checkpoint(target, args.runs, args.train_args.split(), args.data_dir)
        trained[target] = minutes
        model, config = lesson04.load_model(path, device)
        alpha_bars = lesson04.make_schedule(config["schedule"], device, config["timesteps"])["alpha_bars"]
        noises = torch.randn((args.samples, config["channels"], config["image_size"], config["image_size"]),
                             generator=torch.Generator().manual_seed(0))
        options = argparse.Namespace(batch_size=SAMPLE_BATCH_SIZE, seed=0, timestep_spacing=args.timestep_spacing,
                                     clip_x0=None)

        def measure(sampler, calls, count):
            images, seconds = compare.draw(sampler, calls, 0.0 if sampler == "ddim" else "", model, config,
                                           noises[:count], options, device)
            scores = metrics.evaluate(images, config["dataset"], data_dir=args.data_dir,
                                      cache_dir=METRICS_CACHE, device=str(device))
            row = {"target": target, "sampler": sampler, "calls": calls,
                   "steps": lesson04.solver_steps(sampler, calls) if sampler != "ddpm" else calls, "samples": count,
                   "fd": round(scores["fd"], 2), "floor": round(scores["fd_real_floor"], 2),
                   "fd_minus_floor": round(scores["fd"] - scores["fd_real_floor"], 2),
                   "seconds_per_image": round(seconds / count, 4)}
            print(" ".join(f"{key}={value}" for key, value in row.items()),
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            rows.append(row)

        if args.ddpm_samples:
            measure("ddpm", config["timesteps"], min(args.ddpm_samples, args.samples))
        for sampler in args.samplers:
            for calls in args.calls:
                measure(sampler, calls, args.samples)
        straight[target] = None
        if not args.no_straightness:
            with torch.inference_mode():
                straight[target] = straightness(model, config, alpha_bars, noises[:256].to(device))
            print(f"{target}: straightness {straight[target]:.4f}", flush=True)
        write(rows, straight, trained, args, time.perf_counter() - started)  # after each target: a stopped run
        # keeps what it measured


def shown(path):
    """path relative to the repository when it lies inside it (the results name no one's home folder)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write(rows, straight, trained, args, seconds):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"flow_matching_{args.results_tag}"
    with open(stem.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| target | sampler | " + " | ".join(f"{calls} calls" for calls in args.calls) + " | DDPM-1000 |",
             "|---|---|" + "---|" * (len(args.calls) + 1)]
    done = [target for target in args.targets if target in straight]
    for target in done:
        ddpm = [row for row in rows if row["target"] == target and row["sampler"] == "ddpm"]
        for sampler in args.samplers:
            by_calls = {row["calls"]: row for row in rows if row["target"] == target and row["sampler"] == sampler}
            cells = [f"{by_calls[calls]['fd_minus_floor']:.2f}" if calls in by_calls else "" for calls in args.calls]
            name = lesson04.SAMPLER_NAMES[sampler] + (" = Euler" if sampler == "ddim" else "")
            last = f" | {ddpm[0]['fd_minus_floor']:.2f} ({ddpm[0]['samples']}) |" if ddpm else " | |"
            lines.append(f"| {target} | {name} | " + " | ".join(cells) + last)
    lines += ["", "FD - floor (utils.metrics, floor at the same count); Heun at N calls takes (N + 1) // 2 steps "
                  "(2 steps - 1 calls). DDPM-1000 at the count in brackets.", "",
              "| target | straightness: RMS from the one-call answer to the 200-step end | trained here |",
              "|---|---|---|"]
    lines += [f"| {target} | {'not measured' if straight[target] is None else '%.4f' % straight[target]} | "
              f"{'%.1f min' % trained[target] if trained[target] is not None else 'no: checkpoint reused'} |"
              for target in done]
    at_ten = [row for row in rows if row["calls"] == 10 and row["sampler"] != "ddpm"]
    ddpm = {row["target"]: row for row in rows if row["sampler"] == "ddpm"}
    if at_ten and ddpm:
        best = min(at_ten, key=lambda row: row["fd_minus_floor"])
        best_ddpm = min(ddpm.values(), key=lambda row: row["fd_minus_floor"])
        lines += ["", f"Best at 10 calls: {best['target']} with {lesson04.SAMPLER_NAMES[best['sampler']]}, "
                      f"{best['fd_minus_floor']:.2f}: "
                      + (f"{best['fd_minus_floor'] / ddpm[best['target']]['fd_minus_floor']:.2f}x its own "
                         f"DDPM-1000, " if best["target"] in ddpm else "")
                      + f"{best['fd_minus_floor'] / best_ddpm['fd_minus_floor']:.2f}x the best DDPM-1000 "
                        f"({best_ddpm['target']})."]
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    if done != list(args.targets):
        lines += ["", f"Measured so far: {', '.join(done)} of {', '.join(args.targets)}."]
    lines += ["", f"`python benchmarks/flow_matching.py --targets {','.join(args.targets)} --calls "
                  f"{','.join(map(str, args.calls))} --samples {args.samples} --ddpm-samples {args.ddpm_samples}"
                  f" --samplers {','.join(args.samplers)}"
                  + (f" --timestep-spacing {args.timestep_spacing}" if args.timestep_spacing else "")
                  + (" --no-straightness" if args.no_straightness else "")
                  + f" --results-tag {args.results_tag}` "
                  f"on {machine}, torch {torch.__version__}, {seconds / 60:.1f} min; runs in {shown(args.runs)}."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    draw_figure(rows, stem.with_suffix(".png"))
    print("\n".join(lines))
    print(f"wrote {stem.with_suffix('.md')}, {stem.with_suffix('.csv')}, {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
