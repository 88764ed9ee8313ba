"""TensorBoard and Weights & Biases copies of metrics.jsonl, each an optional extra (pip install .[dashboards]).
Each has log(record) and close()."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gpt2_jax.config import ConfigError, TrainConfig


class TensorBoard:
    """Event files in out_dir/tensorboard with every metric of each record, at its step. Written synchronously
    (tensorboardX's SummaryWriter queues events in a thread, which a kill -9 loses): each record is on disk before
    the checkpoint after it."""

    def __init__(self, out_dir: Path, start_step: int):
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            from tensorboardX.summary import scalar
        except ImportError:
            raise ConfigError("--tensorboard=true needs tensorboardX: pip install tensorboardX") from None
        self.Event, self.scalar = Event, scalar
        directory = out_dir / "tensorboard"
        directory.mkdir(exist_ok=True)
        self.writer = EventsWriter(str(directory / "events"), filename_suffix=f".{os.getpid()}.{start_step}")
        if start_step:  # TensorBoard drops what the interrupted run logged after the checkpoint resumed here
            self.writer.write_event(Event(wall_time=time.time(), step=start_step + 1,
                                          session_log=SessionLog(status=SessionLog.START)))

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step":
                self.writer.write_event(self.Event(wall_time=time.time(), step=record["step"],
                                                   summary=self.scalar(key, float(value))))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (WANDB_MODE=offline keeps it on disk); a resumed run continues the run of run_id."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, run_id: str | None, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb_log=true needs wandb: pip install wandb") from None
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, id=run_id,
                              resume="allow", dir=str(out_dir), config=config)
        self.id = self.run.id

    def log(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_dashboards(cfg: TrainConfig, out_dir: Path, start_step: int, wandb_id: str | None, config: dict) -> tuple:
    """The dashboards that the flags ask for: TensorBoard (--tensorboard), wandb (--wandb_log)."""
    dashboards = []
    if cfg.tensorboard:
        dashboards.append(TensorBoard(out_dir, start_step))
    if cfg.wandb_log:
        dashboards.append(WandB(cfg, out_dir, wandb_id, config))
    return tuple(dashboards)
