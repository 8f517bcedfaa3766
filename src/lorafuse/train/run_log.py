"""The loss / LR record of a training run: one CSV row per optimizer step, a PNG plot at the end.

(Not named `logging.py`, which would read like the standard library's module wherever this package is imported.)
Rows are appended and flushed as they come, so a killed run leaves a readable CSV up to its last step; a resumed
run starts from the rows saved with its state and drops any the killed run wrote after that state.
`loss_avg` is the mean loss of the current epoch so far (kohya's "avr_loss").
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lorafuse.errors import OutputError
from lorafuse.utils.atomic import atomic_path, atomic_write_text, is_disk_full

COLUMNS = ("step", "epoch", "loss", "loss_avg", "lr_unet", "lr_text_encoder", "seconds", "val_loss")


def read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


class RunLog:
    def __init__(
        self, csv_path: Path, *, history: Path | None = None, up_to_step: int = 0, jsonl: bool = False
    ):
        self.csv_path = csv_path
        self.jsonl_path = csv_path.with_suffix(".jsonl") if jsonl else None
        self.rows: list[dict[str, float]] = []
        if history is not None and history.is_file():
            self.rows = [r for r in read_rows(history) if r["step"] <= up_to_step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(csv_path, buf.getvalue())
        if self.jsonl_path is not None:
            atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def epoch_average(self, epoch: int, loss: float) -> float:
        losses = [r["loss"] for r in self.rows if r["epoch"] == epoch] + [loss]
        return sum(losses) / len(losses)

    def log(self, row: dict[str, float]) -> None:
        row = {k: row[k] for k in COLUMNS if row.get(k) is not None}
        self.rows.append(row)
        path = self.csv_path
        try:
            with open(path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=COLUMNS).writerow(row)
            if self.jsonl_path is not None:
                path = self.jsonl_path
                with open(path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise OutputError(f"{path}: the disk is full; the log ends before step {int(row['step'])} (the LoRA "
                              "files and states saved so far are whole). Free some space, then resume from the "
                              "last state.") from None  # fmt: skip

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]

    def plot(self, png: Path, title: str = "") -> Path | None:
        """Loss per step, its per-epoch running mean, and the learning rate on a second axis."""
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot(steps, self.losses, lw=0.8, alpha=0.4, color="tab:blue", label="loss")
        ax.plot(steps, [r["loss_avg"] for r in self.rows], lw=1.6, color="tab:blue", label="epoch mean")
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        if val:  # held-out loss at fixed noise and timesteps (train/validation.py)
            ax.plot(*zip(*val, strict=True), "o-", lw=1.6, ms=3, color="tab:red", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        lr_ax = ax.twinx()
        for key, colour in (("lr_unet", "tab:orange"), ("lr_text_encoder", "tab:green")):
            if any(key in r for r in self.rows):
                lr_ax.plot(
                    steps, [r.get(key, float("nan")) for r in self.rows], lw=1.0, color=colour, label=key
                )
        lr_ax.set_ylabel("learning rate")
        handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper right", fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return png
