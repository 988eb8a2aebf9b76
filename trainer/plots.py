"""The pictures a training run leaves behind: its curves, and the per-split scores of ``svp eval``.

TensorBoard holds every logged scalar, but needs a server and a browser; a run directory copied off
a cluster node should show at a glance whether the loss fell and the cIoU rose. So the end of
``svp train`` draws ``RUN/training_curves.png`` from the run's own event files (what was logged,
step for step, not a second record kept beside it), and ``svp eval`` draws its report as a bar chart.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import MaxNLocator

from pipeline.errors import SvpError
from pipeline.plotting import pyplot, save_figure

TENSORBOARD_DIR = "tensorboard"  # Accelerate's tracker writes RUN/tensorboard/events.out.tfevents.*
LOSS_TAGS = ("loss", "ce_loss", "bce_loss", "dice_loss", "region_loss")
CIOU_TAG = "train_batch_ciou"
VALIDATION_TAGS = ("eval_ciou/", "eval_giou/")  # + split: what --eval-every logs (trainer.validation)
LR_TAG = "lr"
CURVES_FILE = "training_curves.png"


class PlotError(SvpError, ValueError):
    """There is nothing to plot (no event files, no scores)."""


def training_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar the run logged, as {tag: (steps, values)} in step order.

    A resumed run writes a new event file and logs again the steps after its checkpoint: for a
    step logged twice the later write (by wall time) is the one kept, as it is the run's history.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    directories = sorted({path.parent for path in (run_dir / TENSORBOARD_DIR).rglob("events.out.tfevents.*")})
    if not directories:
        raise PlotError(f"no TensorBoard event files under {run_dir / TENSORBOARD_DIR}: "
                        f"is {run_dir} a run of svp train?")
    events: dict[str, list] = {}
    for directory in directories:
        accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})  # 0: keep every event
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            events.setdefault(tag, []).extend(accumulator.Scalars(tag))
    series = {}
    for tag, scalars in sorted(events.items()):
        by_step = {event.step: event.value for event in sorted(scalars, key=lambda event: event.wall_time)}
        steps = sorted(by_step)
        series[tag] = (steps, [by_step[step] for step in steps])
    return series


def training_curves(run_dir: Path) -> Path:
    """Draw ``RUN/training_curves.png``: the loss terms, train-batch cIoU, validation cIoU/gIoU per
    split (with ``--eval-every``) and learning rate against the step, exactly as
    :func:`training_series` reads them; return its path."""
    series = training_series(run_dir)
    panels = [("loss", [tag for tag in LOSS_TAGS if tag in series], "linear"),
              ("train-batch cIoU", [CIOU_TAG] if CIOU_TAG in series else [], "linear"),
              ("validation IoU", [tag for tag in series if tag.startswith(VALIDATION_TAGS)], "linear"),
              ("learning rate", [LR_TAG] if LR_TAG in series else [], "log")]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        raise PlotError(f"the event files of {run_dir} hold none of {', '.join((*LOSS_TAGS, CIOU_TAG, LR_TAG))}")
    plt = pyplot()
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for axis, (label, tags, scale) in zip(axes[:, 0], panels):
        for tag in tags:
            steps, values = series[tag]
            axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=tag)
        axis.set_ylabel(label)
        axis.set_yscale(scale)
        axis.grid(alpha=0.3)
        if len(tags) > 1:
            axis.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_title(f"training curves: {run_dir.name}")
    figure.tight_layout()
    return save_figure(figure, run_dir / CURVES_FILE)


def eval_chart(reports: list[dict], path: Path) -> Path:
    """A bar chart of ``svp eval`` reports on the same splits: each run's cIoU and gIoU per split,
    with the all-foreground cIoU (predicting every pixel: the floor a model must clear) beside them."""
    splits = reports[0].get("splits") if reports else None
    if not splits:
        raise PlotError("the evaluation report has no splits to chart")
    plt = pyplot()
    names = list(splits)
    bars = [(report, f"{Path(report.get('run', '')).name} {label}" if len(reports) > 1 else label, key)
            for report in reports for label, key in (("cIoU", "ciou"), ("gIoU", "giou"))]
    bars.append((reports[0], "all-foreground cIoU", "all_foreground_ciou"))
    width = 0.8 / len(bars)
    figure, axis = plt.subplots(figsize=(1.2 + (0.8 + 0.4 * len(bars)) * len(names), 3.8))
    for offset, (report, label, key) in enumerate(bars):
        positions = [i + (offset - (len(bars) - 1) / 2) * width for i in range(len(names))]
        drawn = axis.bar(positions, [report["splits"][name][key] for name in names], width, label=label)
        axis.bar_label(drawn, fmt="%.3f", fontsize=7)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("IoU")
    source = reports[0].get("source", {})
    projectors = ", ".join(report.get("projector", "?") for report in reports)
    axis.set_title(f"{source.get('dataset', '')} ({source.get('split_by', '')}), projector {projectors}", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
