"""Every benchmark, side by side in one process: ``python -m bench`` (``make bench``, ``make bench-gpu``).

Parts (each also runs alone as ``python -m bench.<part>``, with the same flags):

- ``tokens``: visual tokens per image of ``mlp``, ``pool`` and ``svp`` on the same images;
- ``train_step``: step time and inference latency per projector at two LLM sizes, and the step
  with precomputed SAM embeddings vs running the SAM encoder;
- ``precompute``: our SAM superpixels vs SAM's reference generator, and the job with 1 vs 2 workers;
- ``accuracy``: cIoU/gIoU of mlp, pool and the svp ablation ladder at an equal training budget.

``--preset`` sizes the parts: ``cpu`` (the default, ``make bench``) runs in about a quarter of an
hour on 2 CPU cores with fewer accuracy steps and seeds and fewer timing repetitions than
``full`` (``make bench BENCH_FLAGS="--preset full"``, about an hour and a half: the recorded CPU
sizes); ``quick`` is toy sizes, ``gpu`` is ``make bench-gpu``.

Prints each part's table and notes, then the headline figures with the preset, the minutes and
every note (what shrank from ``full``; the seeds and steps behind each cIoU), and writes
``RESULTS/latest.json`` (the headline, ``preset`` and ``notes`` at the top level, each part's
full results under ``parts``) and ``RESULTS/<part>.json``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from bench import accuracy, precompute, tokens, train_step
from bench.common import (
    COMMON_PRESETS,
    describe_device,
    differences_from_full,
    machine_load,
    parse_args,
    run_parts,
    write_json,
)

PARTS = (tokens, train_step, precompute, accuracy)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(PARTS, argv, "python -m bench", __doc__.split("\n")[0])
    before = machine_load(args)  # and the commit of the code that runs, read before HEAD may move
    started = time.perf_counter()
    parts = run_parts(PARTS, args)
    load = os.getloadavg()
    latest = {
        "device": describe_device(args.device),
        "preset": args.preset,
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
        # What shrank from the full preset and what each cIoU rests on, beside the figures it qualifies.
        **before,
        "load_average": load,
        "notes": [*differences_from_full(args, COMMON_PRESETS["full"]), *shared_cpu_note(load[2]),
                  *(f"{name}: {note}" for name, results in parts.items() for note in results["notes"])],
    }
    for results in parts.values():
        latest.update(results["headline"])
    latest["parts"] = parts
    write_json(args.results / "latest.json", latest)
    print(format_headline(latest))
    return latest


def shared_cpu_note(load_15min: float) -> list[str]:
    """A note when other processes shared the CPU during most of the run (the 15-minute load average
    at its end well above the cores), so that its seconds and minutes are not read as a quiet machine's."""
    cores = os.cpu_count() or 1
    if load_15min <= 1.25 * cores:
        return []
    return [f"the 15-minute load average at the end was {load_15min:.1f} on {cores} cores: other processes shared "
            "the CPU, so the timings and the minutes are those of a busy machine"]


def format_headline(latest: dict) -> str:
    lines = [f"headline ({latest['preset']} preset, {latest['device']}, {latest['seconds'] / 60:.1f} min)"]
    for part in latest["parts"].values():
        lines += [f"  {key:<36}{value:>10.4f}" if value is not None else f"  {key:<36}{'-':>10}"
                  for key, value in part["headline"].items()]
    lines += [f"  note: {note}" for note in latest["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
