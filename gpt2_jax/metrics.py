"""A training run's progress lines, its metrics log (metrics.jsonl) and its loss curve (loss.png)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.figure import Figure  # the object API draws off-screen without choosing a pyplot backend
from tqdm import tqdm

from gpt2_jax import sharding


def say(text: str) -> None:
    """Print a progress line on the main process only (every process of a multi-host run prints alike)."""
    if sharding.is_main_process():
        tqdm.write(text)


def progress(step: int, out: dict, grad_clip: float, seconds_per_step: float, tokens_per_step: int,
             flops_per_step: float, peak: float) -> dict:
    """A step's metrics record from the train step's out (loss, lr, grad_norm as floats): those, whether clipping
    scaled the update (optax's clip_by_global_norm scales a norm above grad_clip), and the speed (mfu against a
    peak of `peak` FLOP/s)."""
    return {"step": step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
            "clipped": bool(0 < grad_clip < out["grad_norm"]), "tokens_per_s": tokens_per_step / seconds_per_step,
            "ms_per_step": 1e3 * seconds_per_step, "mfu": flops_per_step / seconds_per_step / peak}


def eval_line(step: int, record: dict) -> str:
    """An eval step's losses (and HellaSwag scores) in one line."""
    scored = (f", hellaswag acc {record['hellaswag_acc']:.4f} acc_norm {record['hellaswag_acc_norm']:.4f}"
              if "hellaswag_acc" in record else "")
    return f"step {step}: train loss {record['loss']:.4f}, val loss {record['val_loss']:.4f}{scored}"


class LogError(Exception):
    """metrics.jsonl or loss.png could not be written (disk full, read-only file system)."""


def log_error(path: Path, error: OSError) -> LogError:
    return LogError(f"cannot write {path} ({error.strerror or error})")


class Metrics:
    """metrics.jsonl (one object a line) and the loss-curve PNG in out_dir. A write that fails during the run is
    kept in `error` (the run saves a checkpoint and stops on it), and nothing more is written."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool = True, dashboards: tuple = ()):
        self.path, self.png = out_dir / "metrics.jsonl", out_dir / "loss.png"
        self.records, self.enabled = [], enabled  # disabled: the processes that are not the main one
        self.dashboards = dashboards  # gpt2_jax.dashboards: TensorBoard, wandb
        self.error: LogError | None = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run drops what the interrupted run logged after its checkpoint
            self.records = [r for r in self.read() if r["step"] <= start_step]
        # Through a temporary file: a kill while it is written leaves the old log, not a cut one.
        temporary = self.path.with_suffix(".jsonl.tmp")
        try:
            temporary.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(temporary, self.path)
        except OSError as e:
            raise log_error(self.path, e) from None
        if self.png.exists():  # the curve loses the dropped steps too, not only at the next eval
            self.plot()
        if self.error is not None:
            raise self.error

    def read(self) -> list[dict]:
        """The records of an existing metrics.jsonl; a line cut off by a kill (or otherwise unreadable) is skipped
        with a warning: the checkpoint, not this log, is what a resumed run needs."""
        records = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            elif line.strip():
                say(f"warning: {self.path}:{number} is not a metrics record; dropped")
        return records

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled or self.error is not None:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            self.error = log_error(self.path, e)
        for dashboard in self.dashboards:
            dashboard.log(record)

    def close(self) -> None:
        for dashboard in self.dashboards:
            dashboard.close()
        self.dashboards = ()

    def plot(self) -> None:
        """loss.png: the train and val loss above, the gradient norm (before clipping) below, and the HellaSwag
        accuracies at the bottom in a run that scores them."""
        if not self.enabled or self.error is not None:
            return
        scores = {key: [(r["step"], r[key]) for r in self.records if key in r]
                  for key in ("hellaswag_acc", "hellaswag_acc_norm")}
        fig = Figure(figsize=(7, 8 if scores["hellaswag_acc"] else 6))
        axes = fig.subplots(3 if scores["hellaswag_acc"] else 2, 1, sharex=True,
                            height_ratios=(2, 1, 1) if scores["hellaswag_acc"] else (2, 1))
        loss_ax, norm_ax = axes[:2]
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        for points, label in ((train, "train"), (val, "val")):
            if points:
                loss_ax.plot(*zip(*points), label=label, marker="o" if label == "val" else None)
        loss_ax.set(ylabel="loss", title="cross-entropy loss")
        if train or val:
            loss_ax.legend()
        norms = [(r["step"], r["grad_norm"]) for r in self.records if "grad_norm" in r]
        if norms:
            norm_ax.plot(*zip(*norms), color="tab:green")
        norm_ax.set(ylabel="grad norm")
        if scores["hellaswag_acc"]:
            for key, points in scores.items():
                axes[2].plot(*zip(*points), marker="o", label=key.removeprefix("hellaswag_"))
            axes[2].set(ylabel="HellaSwag")
            axes[2].legend()
        axes[-1].set(xlabel="step")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        temporary = self.png.with_suffix(".png.tmp")  # a kill while it is drawn leaves the previous curve
        try:
            fig.savefig(temporary, dpi=100, format="png")
            os.replace(temporary, self.png)
        except OSError as e:
            self.error = log_error(self.png, e)
