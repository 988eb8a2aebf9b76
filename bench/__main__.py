"""Every benchmark, side by side in one process: ``python -m bench`` (``make bench``, ``make bench-gpu``).

Parts (each also runs alone as ``python -m bench.<part>``, with the same flags):

- ``tokens``: visual tokens per image of ``mlp``, ``pool`` and ``svp`` on the same images;
- ``train_step``: step time and inference latency per projector at two LLM sizes, and the step
  with precomputed SAM embeddings vs running the SAM encoder;
- ``precompute``: our SAM superpixels vs SAM's reference generator, and the job with 1 vs 2 workers;
- ``accuracy``: cIoU/gIoU of mlp, pool and the svp ablation ladder at an equal training budget.

Prints each part's table, then the headline figures, and writes ``RESULTS/latest.json`` (the
headline at the top level, each part's full results under ``parts``) and ``RESULTS/<part>.json``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

from bench import accuracy, precompute, tokens, train_step
from bench.common import describe_device, parse_args, run_parts, write_json

PARTS = (tokens, train_step, precompute, accuracy)


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(PARTS, argv, "python -m bench", __doc__.split("\n")[0])
    commit = git_commit()  # the code that runs: read before an hour in which HEAD may move
    started = time.perf_counter()
    parts = run_parts(PARTS, args)
    latest = {
        "device": describe_device(args.device),
        "preset": args.preset,
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
    }
    for results in parts.values():
        latest.update(results["headline"])
    latest["parts"] = parts
    write_json(args.results / "latest.json", latest)
    print(format_headline(latest))
    return latest


def format_headline(latest: dict) -> str:
    lines = [f"headline ({latest['preset']} preset, {latest['device']}, {latest['seconds'] / 60:.1f} min)"]
    for part in latest["parts"].values():
        lines += [f"  {key:<36}{value:>10.4f}" if value is not None else f"  {key:<36}{'-':>10}"
                  for key, value in part["headline"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
