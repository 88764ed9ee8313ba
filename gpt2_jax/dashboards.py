"""TensorBoard and Weights & Biases copies of metrics.jsonl, each an optional extra (pip install .[dashboards]).
Each has log(record) and close()."""

from __future__ import annotations

from pathlib import Path

from gpt2_jax.config import ConfigError, TrainConfig


class TensorBoard:
    """Event files in out_dir/tensorboard with every metric of each record, at its step."""

    def __init__(self, out_dir: Path, start_step: int):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard=true needs tensorboardX: pip install tensorboardX") from None
        # A resumed run: TensorBoard hides what the interrupted run logged after the checkpoint (purge_step).
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, float(value), record["step"])
        self.writer.flush()  # on disk before the next checkpoint: a resume purges only what came after it

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
