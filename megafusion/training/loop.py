"""`megafusion train`: the explicit training loop, readable top to bottom.

    setup:  parallel groups -> claim the run folder (training/run_folder.py: one live run per training.run_dir; a
            fresh run never starts over another run's checkpoints) -> open and validate data.paths (bad data named
            before anything is built) -> model chunks (DDP) -> optimizer + LR schedule
            -> loss weighting -> resume -> data -> metrics (steps after the resumed one dropped)
    step:   micro-batches (noised) -> forward_backward_func -> NaN guard -> clip + update -> LR + EMA -> log
            -> maybe evaluate -> maybe checkpoint -> agreed stop on SIGTERM/SIGUSR1 or the wall-clock budget
    end:    rank 0 writes <run_dir>/last_exit.json (finished, or stopped and why), which launchers read
            (training/exit_record.py; launch/common.sh requeues a SLURM job by it)

A save that falls due on a step the NaN guard skipped (nan_policy=skip) is taken: the weights, optimizer, LR
schedule and loss-weighting EMA are the last good step's, saved under the current step with the data position past
the bad batch (see nan_guard.py). A save that cannot be taken (weights hold NaN/Inf) ends the run with
CheckpointRefused, a non-zero exit. The log reports a save only after it is published.

Every rank runs the same loop; logged values are reduced over data-parallel ranks and taken from the last
pipeline stage, so every rank holds the same numbers (the adaptive-weighting EMA relies on it).
`train(cfg)` returns the per-step records it logged (tests compare them across parallel layouts).
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megafusion.checkpoint.checkpointer import checkpoint_root, resume, save_checkpoint
from megafusion.checkpoint.train_state import TrainState
from megafusion.config import Config, save_config, to_yaml
from megafusion.data.loader import build_data_iterators, open_datasets
from megafusion.discrete.loader import build_discrete_iterators
from megafusion.discrete.rows import open_discrete_datasets
from megafusion.discrete.vocab import MODALITY_NAMES
from megafusion.model import build_transformer_config, model_provider
from megafusion.objectives import build_loss_weighting, reduce_for_weighting
from megafusion.objectives.masked_diffusion import vocab_from_config
from megafusion.parallel.initialize import ParallelInfo, collective_device, destroy_parallel, initialize_parallel
from megafusion.parallel.liveness import name_lost_peers
from megafusion.parallel.wrapping import use_bf16, wrap_model
from megafusion.training.exit_record import write_exit_record
from megafusion.training.flops import TokenMix, flops_per_step, steps_from_flops_budget
from megafusion.training.forward_step import average_reports, is_summed, make_forward_step, noisy_microbatches
from megafusion.training import batch_rescale
from megafusion.training.metrics import MetricsWriter, format_line, resolve_peak_flops
from megafusion.training.moe_metrics import MoEMeter
from megafusion.training.nan_guard import NanGuard
from megafusion.training.optimizer import build_lr_scheduler, build_optimizer
from megafusion.training.run_folder import claim_run_folder
from megafusion.training.signals import REQUESTED, StopSignal
from megafusion.utils.files import ensure_writable_dir

logger = logging.getLogger("megafusion.train")

STOP_CAUSES = {"exit_interval": "training.exit_interval", "exit_duration": "training.exit_duration_minutes",
               "signal": "a signal"}
REPORT_KEYS = ("loss", "loss_ce", "loss_fm", "weight_ce", "weight_fm", "text_tokens", "latent_tokens")
MASKED_KEYS = tuple(f"md_{kind}_{m}" for m in MODALITY_NAMES for kind in ("sum", "count"))


def clip_by_total_norm(optimizer, grad_norm: float) -> None:
    """Clip with the norm already computed for the NaN guard, as megatron's ChainedOptimizer.step does (its own
    clip_grad_norm would compute the norm a second time)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            decoupled = opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                                    use_decoupled_grad=decoupled)


def train(cfg: Config) -> List[Dict[str, float]]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # megatron logs every parameter name at INFO
    ensure_writable_dir(cfg.training.run_dir, "training.run_dir")  # before any compute: named, one line
    if cfg.checkpoint.save_dir:
        ensure_writable_dir(cfg.checkpoint.save_dir, "checkpoint.save_dir")
    info = initialize_parallel(cfg.parallel, cfg.training.seed)
    lock = None
    try:
        lock = claim_run_folder(cfg, checkpoint_root(cfg))
        trainer = None  # a collective failing on a lost peer -> PeerLostError naming it and the step (liveness.py)
        with name_lost_peers(lambda: trainer.state.step if trainer is not None else None):
            # validated before the model is built: bad data is named first
            datasets = open_datasets(cfg) if cfg.objective.kind == "flow_matching" else open_discrete_datasets(
                cfg.data.paths, vocab_from_config(cfg.objective.masked_diffusion), cfg.data.seq_length)
            trainer = Trainer(cfg, info, datasets)
            return trainer.run()
    finally:
        if lock is not None:
            lock.release()
        destroy_parallel()


class Trainer:
    def __init__(self, cfg: Config, info: ParallelInfo, datasets: Optional[list] = None):
        """`datasets`: data.paths already opened and validated (loader.open_datasets); None opens them here."""
        self.cfg, self.info = cfg, info
        t = cfg.training
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * info.dp_size)
        if self.num_microbatches * t.micro_batch_size * info.dp_size != t.global_batch_size:
            raise ValueError(f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                             f"micro_batch_size * data-parallel size = {t.micro_batch_size} * {info.dp_size}")
        self.model = wrap_model(partial(model_provider, cfg), cfg)
        self.masked = cfg.objective.kind == "masked_diffusion"
        self.report_keys = ("loss", "masked_tokens") + MASKED_KEYS if self.masked else REPORT_KEYS
        mix = TokenMix.masked_diffusion(cfg) if self.masked else TokenMix.estimate(cfg, latent_fraction=0.5)
        self.flops_per_step = flops_per_step(build_transformer_config(cfg), mix)
        self.total_steps = t.train_steps if t.train_steps is not None else steps_from_flops_budget(
            t.flops_budget, self.flops_per_step)
        rescaled = batch_rescale.rescale(cfg, self.total_steps) if self.total_steps else None
        if rescaled is not None:  # optimizer.sde_rescale: the optimizer runs the values for this batch and horizon
            cfg = batch_rescale.rescaled_config(cfg, self.total_steps)  # self.cfg (saved) keeps the tuned values
            if info.rank == 0:
                logger.info("optimizer.sde_rescale: %s", rescaled.describe())
        self.optimizer = build_optimizer(cfg, self.model)
        self.model_config = self.model[0].config
        self.model_config.grad_scale_func = self.optimizer.scale_loss
        self.moe_meter = MoEMeter(self.model_config, self.model, info.dp_size, info.tp_size, info.device)
        # train_steps=0 (a seed checkpoint) takes no step; any valid schedule length will do.
        schedule_steps = self.total_steps or cfg.optimizer.warmup_steps + 1
        self.scheduler = build_lr_scheduler(cfg, self.optimizer, schedule_steps)
        self.weighting = build_loss_weighting(cfg.objective)
        self.guard = NanGuard(cfg.training.nan_policy)
        self.state = TrainState()
        self.last_saved_step: Optional[int] = None
        self.save_dir = checkpoint_root(cfg)
        loaded = resume(cfg, self.save_dir, self.model, self.optimizer, scheduler=self.scheduler,
                        loss_weighting=self.weighting)
        if loaded is not None:
            self.state = loaded.train_state
            self.last_saved_step = self.state.step
            if info.rank == 0:
                logger.info("resumed from %s at step %d of %d", loaded.path, self.state.step, self.total_steps)
        build_iterators = build_discrete_iterators if self.masked else build_data_iterators
        self.train_iter, self.valid_iter = build_iterators(
            cfg, info.dp_rank, info.dp_size, self.state.consumed_samples,
            data_state=loaded.data_state if loaded is not None else None, datasets=datasets)
        self.forward_backward = get_forward_backward_func()
        self.forward_step = make_forward_step(self.weighting, cfg.objective)
        self.dtype = torch.bfloat16 if use_bf16(cfg) else None
        self.is_logger = info.rank == 0
        self.metrics = MetricsWriter(t.run_dir, self.is_logger, cfg.logging.tensorboard, resume_step=self.state.step,
                                     config=self.cfg)
        if self.metrics.dropped:
            logger.info("metrics.jsonl: dropped %d line(s) after step %d, logged by an earlier run that this run "
                        "redoes", self.metrics.dropped, self.state.step)
        self.peak_flops = resolve_peak_flops(cfg.logging.peak_flops)
        if self.is_logger:
            os.makedirs(t.run_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(t.run_dir, "config.yaml"))

    # ------------------------------------------------------------------ one step
    def _microbatches(self, iterator) -> List:
        items = []
        for _ in range(self.num_microbatches):
            first = iterator.consumed_samples + self.info.dp_rank * self.cfg.training.micro_batch_size
            items.append((next(iterator), first))
        return noisy_microbatches(items, self.cfg.objective, self.cfg.training.seed, self.info.device, self.dtype)

    def _run_schedule(self, batches, forward_only: bool) -> List[Dict[str, torch.Tensor]]:
        chunks = len(self.model)
        iterators = [iter(batches) for _ in range(chunks)]
        return self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=iterators if chunks > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(batches),
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=batches[0].batch_size,  # 2x training.micro_batch_size with anti-masking
            forward_only=forward_only,
        )

    def _global(self, reports: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Means over micro-batches and DP ranks (token counts summed), identical on every rank."""
        local = average_reports(reports) if reports else {}
        keys = self.report_keys
        vec = torch.tensor([float(local.get(k, 0.0)) for k in keys], dtype=torch.float64,
                           device=collective_device())
        if not self.info.is_last_stage:
            vec.zero_()
        dist.all_reduce(vec)  # only last-stage ranks contribute: tp_size * dp_size of them
        vec /= self.info.tp_size
        values = {k: float(v) for k, v in zip(keys, vec.cpu().tolist())}
        for k in keys:
            if not is_summed(k):
                values[k] /= self.info.dp_size
        for m in MODALITY_NAMES if self.masked else ():
            total, count = values.pop(f"md_sum_{m}"), values.pop(f"md_count_{m}")
            if count > 0:  # per-position NELBO of the modality's positions in this step
                values[f"loss_{m}"] = total / count
        return values

    def train_step(self) -> Dict[str, float]:
        batches = self._microbatches(self.train_iter)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_schedule(batches, forward_only=False)
        self.optimizer.prepare_grads()
        grad_norm = self.optimizer.get_grad_norm()
        local_losses = {k: r[k] for r in reports for k in ("loss_ce", "loss_fm", "loss")}
        values = self._global(reports)
        values.update(self.moe_meter.collect(len(batches)))
        self.state.step += 1
        self.state.consumed_samples += self.cfg.training.global_batch_size
        if self.guard.check(self.state.step, local_losses, grad_norm):
            clip_by_total_norm(self.optimizer, grad_norm)
            self.optimizer.step_with_ready_grads()
            self.scheduler.step(increment=1)
            # Means over the micro-batches (all ranks) that have each term; TP replicas and PP stages without
            # losses do not change them, so the EMA is identical on every rank.
            self.weighting.commit(*reduce_for_weighting([r["loss_ce"] for r in reports],
                                                        [r["loss_fm"] for r in reports]))
        else:
            self.state.skipped_steps += 1
        self.state.total_flops += self.flops_per_step
        # the base schedule's rate (groups of optimizer.groups run multiples of it)
        values.update(grad_norm=float(grad_norm), lr=self.scheduler.get_lr({}),
                      skipped_steps=self.state.skipped_steps)
        return values

    # ------------------------------------------------------------------ evaluation and saving
    def evaluate(self) -> Optional[float]:
        if self.valid_iter is None:
            return None
        self.valid_iter.reset(0)
        for chunk in self.model:
            chunk.eval()
        reports = []
        with torch.no_grad():
            for _ in range(self.cfg.training.eval_steps):
                reports += self._run_schedule(self._microbatches(self.valid_iter), forward_only=True)
        for chunk in self.model:
            chunk.train()
        return self._global(reports)["loss"]

    def save(self) -> bool:
        """Save the current state unless this step is already saved; True when a checkpoint was written. Raises
        CheckpointRefused (every rank) when it cannot be saved."""
        if self.last_saved_step == self.state.step:
            return False
        # Before the first applied update (a seed checkpoint, or only skipped steps) the optimizer has no state.
        optimizer = self.optimizer if self.state.step > self.state.skipped_steps else None
        save_checkpoint(self.save_dir, self.state, self.model, optimizer, scheduler=self.scheduler,
                        loss_weighting=self.weighting, data_state=self.train_iter.state_dict(),
                        config_yaml=to_yaml(self.cfg), keep_last=self.cfg.checkpoint.keep_last, nan_guard=self.guard)
        self.last_saved_step = self.state.step
        if not self.guard.last_ok and self.is_logger:
            logger.info("step %d was skipped by the NaN guard: its checkpoint holds the last good step's weights "
                        "and optimizer state, with the data position past the bad batch", self.state.step)
        return True

    # ------------------------------------------------------------------ the loop
    def run(self) -> List[Dict[str, float]]:
        cfg, records = self.cfg, []
        start_step = self.state.step
        stop = StopSignal.install()
        tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
        deadline = None
        if cfg.training.exit_duration_minutes is not None:
            deadline = time.monotonic() + 60.0 * cfg.training.exit_duration_minutes
        try:
            while self.state.step < self.total_steps:
                start = time.perf_counter()
                values = self.train_step()
                elapsed = time.perf_counter() - start
                values["tokens_per_s"] = tokens_per_step / elapsed
                values["mfu"] = self.flops_per_step / elapsed / (self.info.world_size * self.peak_flops)
                step = self.state.step
                if cfg.training.eval_interval and step % cfg.training.eval_interval == 0:
                    values["valid_loss"] = self.evaluate()
                records.append({"step": step, **values})
                last = step == self.total_steps
                if (step % cfg.logging.log_interval == 0 or last) and self.is_logger:  # the final step always
                    self.metrics.write(step, values)
                    logger.info(format_line(step, self.total_steps, values))
                if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                    self.save()
                planned_exit = bool(cfg.training.exit_interval) and step % cfg.training.exit_interval == 0
                timed_out = deadline is not None and time.monotonic() > deadline
                if timed_out:
                    stop.request()  # agreed over ranks by should_stop, like a signal
                if stop.should_stop() or planned_exit:
                    saved = self.save()
                    # agreed by every rank: a timed-out rank's request() outranks any signal (signals.REQUESTED)
                    reason = ("exit_interval" if planned_exit else
                              "exit_duration" if stop.agreed_signal == REQUESTED else "signal")
                    if self.is_logger:
                        logger.info("stop requested by %s at step %d: %s; exiting", STOP_CAUSES[reason], step,
                                    "checkpoint saved" if saved else "this step's checkpoint was already saved")
                        write_exit_record(cfg.training.run_dir, reason=reason, step=step, start_step=start_step,
                                          total_steps=self.total_steps, checkpoint_step=self.last_saved_step,
                                          signal_number=stop.agreed_signal if reason == "signal" else None)
                    return records
            if cfg.checkpoint.save_at_end:
                self.save()  # with training.train_steps=0 this writes the initial (seed) checkpoint
            if self.is_logger:
                write_exit_record(cfg.training.run_dir, reason="finished", step=self.state.step, start_step=start_step,
                                  total_steps=self.total_steps, checkpoint_step=self.last_saved_step)
            return records
        finally:
            stop.uninstall()
            self.metrics.close()
            self.train_iter.close()
            if self.valid_iter is not None:
                self.valid_iter.close()
