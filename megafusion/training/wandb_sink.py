"""Weights & Biases as a metrics sink (logging.wandb_project, Megatron-LM's --wandb-*): rank 0 logs the numeric
scalars of each metrics.jsonl record at its step, with the resolved config as the run's config.

MetricsWriter (metrics.py) owns the sink and feeds it the same records as metrics.jsonl and TensorBoard. The W&B run
id is kept in <run_dir>/wandb_run_id, so a resumed (or requeued) run continues the same W&B run (resume="allow");
W&B ignores steps it has already seen, so after a resume from step S the steps up to those the earlier run logged
keep that run's values, while metrics.jsonl and TensorBoard take the redone ones. The W&B files go under
<run_dir>/wandb; WANDB_MODE=offline keeps them there (no network) for a later `wandb sync`. W&B's console capture is
off: the log lines stay megafusion's.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Dict, Optional

import yaml

from megafusion.errors import RunError
from megafusion.utils.files import write_atomic

RUN_ID_FILE = "wandb_run_id"


def _run_id(run_dir: str) -> str:
    """The run folder's W&B run id: the one kept in <run_dir>/wandb_run_id, else a new one (8 of [a-z0-9])."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_atomic(path, run_id + "\n")
    return run_id


class WandbSink:
    """One W&B run for one run folder; `log(step, record)` logs a metrics.jsonl record's numbers."""

    def __init__(self, run, run_id: str):
        self.run = run
        self.run_id = run_id

    @classmethod
    def open(cls, cfg, run_dir: str) -> "WandbSink":
        """Start (or resume) the W&B run of `run_dir` for config `cfg` (a megafusion Config)."""
        log = cfg.logging
        try:
            import wandb
        except ImportError as e:
            raise RunError(f"logging.wandb_project={log.wandb_project!r} needs the wandb package: pip install "
                           f"'megafusion[wandb]' (or pip install wandb), or unset logging.wandb_project") from e
        from megafusion.config import to_yaml

        os.makedirs(run_dir, exist_ok=True)
        run_id = _run_id(run_dir)
        try:
            run = wandb.init(project=log.wandb_project, entity=log.wandb_entity,
                             name=log.wandb_run_name or os.path.basename(os.path.abspath(run_dir)),
                             id=run_id, resume="allow", dir=run_dir, config=yaml.safe_load(to_yaml(cfg)),
                             settings=wandb.Settings(console="off", quiet=True))
        except Exception as e:  # wandb raises its own error types (auth, network, init timeout)
            raise RunError(f"logging.wandb_project={log.wandb_project!r}: W&B did not start ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}); log in (wandb login / WANDB_API_KEY), set "
                           f"WANDB_MODE=offline to write the run locally, or unset logging.wandb_project") from e
        return cls(run, run_id)

    def log(self, step: int, record: Dict[str, object]) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}  # as TensorBoard
        if values:
            self.run.log(values, step=step)

    def close(self, exit_code: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
