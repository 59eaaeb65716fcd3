"""Reading runs: their curves over epochs as images, and one table of runs.

A run folder (see :mod:`ssl_lib.train`) holds ``config.yaml`` from the start and
``metrics.json`` from the end of its first epoch. Only these two files are read, so runs in
progress, finished or stopped can all be shown. Epochs are numbered from 0, as in
``metrics.json`` and the progress bar.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ssl_lib.config import ConfigError

# metrics.json key -> (file name under <run>/plots/, axis label); also the panels' order.
CURVES = {
    "train/loss_epoch": ("loss", "training loss (epoch mean)"),
    "train/lr_epoch": ("lr", "learning rate (epoch mean)"),
    "monitor/knn_top1": ("knn_top1", "kNN top-1 (%)"),
    "monitor/online_linear_acc": ("online_linear_acc", "online linear accuracy (%)"),
}
KNN_TOP1, LINEAR_ACC = "monitor/knn_top1", "monitor/online_linear_acc"


def curve(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(epochs, values)`` of ``key`` in the per-epoch ``history`` of ``metrics.json``.

    Epochs without the key (e.g. no kNN measurement that epoch) or with a non-finite value
    (stored as a string) are left out.
    """
    points = [
        (record["epoch"], float(record[key]))
        for record in history
        if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
    ]
    return [e for e, _ in points], [v for _, v in points]


@dataclass(frozen=True)
class Summary:
    """The last and the best (highest; the earliest on ties) value of a monitor, with epochs."""

    final: float
    final_epoch: int
    best: float
    best_epoch: int


def summarize(history: list[dict], key: str) -> Summary | None:
    """:class:`Summary` of ``key`` over ``history``; ``None`` when it was never measured."""
    epochs, values = curve(history, key)
    if not values:
        return None
    best = max(range(len(values)), key=values.__getitem__)
    return Summary(values[-1], epochs[-1], values[best], epochs[best])


def format_duration(seconds: float) -> str:
    """``'42.0 s'``, ``'3 min 07 s'`` or ``'2 h 05 min'``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class Run:
    """A run folder: its resolved config and its ``metrics.json`` (``{}`` before epoch 0 ends)."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def history(self) -> list[dict]:
        return self.metrics.get("history", [])


def _training_config(path: Path) -> dict[str, Any] | None:
    """The config in ``path/config.yaml`` if it is that of a training run, else ``None``."""
    file = path / "config.yaml"
    if not file.is_file():
        return None
    try:
        config = OmegaConf.to_container(OmegaConf.load(file))
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read '{file}': {err}") from None
    method = config.get("method") if isinstance(config, dict) else None
    return config if isinstance(method, dict) and method.get("name") else None


def load_run(path: str | Path, need_metrics: bool = True) -> Run:
    """The run in folder ``path``.

    Raises ``ConfigError`` when ``path`` is not a run folder (no ``config.yaml`` of a training
    run), when a file cannot be read, or with ``need_metrics`` when no epoch has ended yet.
    """
    path = Path(path)
    config = _training_config(path)
    if config is None:
        raise ConfigError(
            f"'{path}' is not a run folder: it has no config.yaml of a training run (ssl-lib "
            f"train writes one in each run folder, e.g. runs/demo_msf)"
        )
    file = path / "metrics.json"
    if not file.is_file():
        if need_metrics:
            raise ConfigError(
                f"run folder '{path}' has no metrics.json yet (written when its first epoch ends)"
            )
        return Run(path, config)
    try:
        metrics = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read '{file}': {err}") from None
    return Run(path, config, metrics)


def find_runs(root: str | Path) -> list[Run]:
    """The run folders in ``root`` and below it (``root`` itself included), sorted by path.

    Raises ``ConfigError`` when ``root`` is not a folder or holds no run folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"'{root}' is not a folder (give the run.output_dir of your runs)")
    runs = [
        load_run(file.parent, need_metrics=False)
        for file in sorted(root.rglob("config.yaml"))
        if _training_config(file.parent) is not None
    ]
    if not runs:
        raise ConfigError(
            f"no run folders in '{root}' (a run folder holds the config.yaml and metrics.json "
            f"that ssl-lib train writes)"
        )
    return runs


def runs_table(runs: list[Run], root: str | Path) -> str:
    """One line per run: folder (relative to ``root``), method, backbone, epochs done / planned,
    final and best kNN top-1 and online linear accuracy (percent), training wall time."""
    header = (
        "run",
        "method",
        "backbone",
        "epochs",
        "kNN final",
        "kNN best",
        "linear final",
        "linear best",
        "wall time",
    )
    rows = [header]
    for run in runs:
        cfg, history = run.config, run.history
        done = history[-1]["epoch"] + 1 if history else 0
        cells = [
            str(run.path.relative_to(root)) if run.path != Path(root) else str(root),
            str(cfg["method"]["name"]),
            str(cfg.get("model", {}).get("backbone", "-")),
            f"{done}/{cfg.get('trainer', {}).get('max_epochs', '-')}",
        ]
        for key in (KNN_TOP1, LINEAR_ACC):
            s = summarize(history, key)
            cells += [f"{s.final:.2f}", f"{s.best:.2f}"] if s else ["-", "-"]
        wall = run.metrics.get("wall_time_s")
        cells.append(format_duration(wall) if isinstance(wall, (int, float)) else "-")
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:  # text columns left-aligned, numbers right-aligned
        cells = [c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure drawn by the Agg backend, without pyplot's global state.

    matplotlib is imported here rather than at the top: the import takes about half a second,
    which every ``ssl-lib`` command would otherwise pay.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _draw(ax: Any, runs: list[tuple[str, list[dict]]], key: str) -> None:
    """One panel: ``key`` against the epoch for each ``(label, history)`` in ``runs``."""
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for label, history in runs:
        epochs, values = curve(history, key)
        if values:
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel(CURVES[key][1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def write_run_plots(run_dir: str | Path, history: list[dict]) -> list[Path]:
    """``run_dir/plots/<name>.png`` for each curve of :data:`CURVES` that ``history`` holds."""
    out = Path(run_dir) / "plots"
    written = []
    for key, (name, _label) in CURVES.items():
        if not curve(history, key)[1]:
            continue  # e.g. no monitors for data without labels
        fig = _figure(5.0, 3.5)
        ax = fig.subplots()
        _draw(ax, [(Path(run_dir).name, history)], key)
        ax.set_title(Path(run_dir).name, fontsize="medium")
        out.mkdir(exist_ok=True)
        fig.savefig(out / f"{name}.png", dpi=100)
        written.append(out / f"{name}.png")
    return written


def plot_runs(runs: list[Run], out: str | Path) -> Path:
    """The curves of :data:`CURVES` for ``runs``, overlaid, in one 2 x 2 figure at ``out``.

    Each run is labelled by its folder's name (its path when two names are the same).

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...); an unknown one raises
    ``ConfigError`` before anything is written.
    """
    out = Path(out)
    fig = _figure(10.0, 7.0)
    formats = fig.canvas.get_supported_filetypes()
    if out.suffix.lower().lstrip(".") not in formats:
        accepted = ", ".join(f".{ext}" for ext in sorted(formats))
        raise ConfigError(f"--out '{out}': unknown image format; accepted suffixes: {accepted}")
    names = [run.path.name for run in runs]  # folder names, or whole paths when they clash
    if len(set(names)) < len(names):
        names = [str(run.path) for run in runs]
    named = list(zip(names, (run.history for run in runs), strict=True))
    axes = fig.subplots(2, 2).ravel()
    for ax, key in zip(axes, CURVES, strict=True):
        _draw(ax, named, key)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda h: len(h[1]))
    if labels:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
