"""The training log, <out_dir>/log.csv (docs/design.md §9, §12): its columns, a new or resumed log, one row
per logged iteration, reading it back, and the curves drawn from it (curves.png).

A resumed run continues from its checkpoint's iteration; the rows a killed run logged after that checkpoint
are dropped before it appends (start_log), so a resumed log holds each iteration once, as an uninterrupted
run's does. The cut-back is written through files.write_text (a temporary file beside the log, renamed over
it), so the log is never left half written."""
import csv
from pathlib import Path

import files

COLUMNS = ["iter", "lr", "loss", "sup", "sup_a", "cons", "cons_w", "ref_delta", "seconds"]


def start_log(path, resume_at=None):
    """A new log holding the header only; or, resuming from the checkpoint of iteration `resume_at`, the log
    as it was at that iteration: the rows after it are dropped (a new log when none is there)."""
    path = Path(path)
    if resume_at is None or not path.exists():
        files.write_text(path, ",".join(COLUMNS) + "\n")
        return
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if row_iteration(line) <= resume_at]
    if len(kept) < len(lines):
        files.write_text(path, "".join(kept))          # atomic: the old log or the new one, no temp file


def row_iteration(line):
    """The iteration a log line was written at; infinite for a line cut short by a kill (no line end)."""
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() and line.endswith("\n") else float("inf")


def append_row(path, row):
    """Append one row (the values of COLUMNS, in order); floats with 6 significant digits."""
    with files.appending(path) as f:
        csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])


def read_log(path):
    """The log's rows as dicts of column -> text."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(log_path, png):
    """Training curves from the log: losses (decoder A's supervised part too), the reference sensitivity (mean
    |change| of decoder A's probability, retrieved vs random references), consistency weight, lr."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(log_path)
    if not rows:
        return
    it = [float(r["iter"]) for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    for key in ("loss", "sup", "sup_a", "cons"):
        axes[0].plot(it, [float(r[key]) for r in rows], label=key)
    axes[0].set_yscale("log"), axes[0].legend(), axes[0].set_title("losses")
    axes[1].plot(it, [float(r["ref_delta"]) for r in rows])
    axes[1].set_title("decoder A: retrieved vs random refs")
    axes[2].plot(it, [float(r["cons_w"]) for r in rows]), axes[2].set_title("consistency weight")
    axes[3].plot(it, [float(r["lr"]) for r in rows]), axes[3].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    files.save_figure(fig, png, dpi=100)
    plt.close(fig)
