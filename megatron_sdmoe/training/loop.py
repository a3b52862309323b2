"""The training loop: global batches in a layout-independent order, forward/backward/step on the
DeepSpeed engine, evaluation (per domain, and the stage matrix at stage ends), metrics and
checkpoints."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_sdmoe.config import Config, skipped_batch_ranges, stage_ends
from megatron_sdmoe.data.datasets import get_batch
from megatron_sdmoe.models.attention import document_attention_mask
from megatron_sdmoe.moe.composition import RouteComposition
from megatron_sdmoe.moe.diagnostics import Diagnostics
from megatron_sdmoe.moe.routes import RouteTokens
from megatron_sdmoe.moe.sdmoe import UpdateProjector, sdmoe_modules
from megatron_sdmoe.runtime import Layout
from megatron_sdmoe.runtime.preemption import StopRequest
from megatron_sdmoe.training.batches import BatchSchedule
from megatron_sdmoe.training.checkpoint import save_checkpoint
from megatron_sdmoe.training.expert_load import ExpertLoadMeter
from megatron_sdmoe.training.metrics import MetricsLogger, Throughput, device_memory
from megatron_sdmoe.training.profiling import StepProfiler
from megatron_sdmoe.training.smoothing import SingularitySmoother
from megatron_sdmoe.training.stage_matrix import StageMatrix
from megatron_sdmoe.training.stages import Stage
from megatron_sdmoe.training.router_state import report_auxiliary_losses, set_auxiliary_loss_scale, update_expert_bias


class Diverged(Exception):
    """Too many optimizer steps in a row were skipped for non-finite gradients."""


class Trainer:
    def __init__(self, cfg: Config, layout: Layout, engine, stages: list[Stage], run_dir: Path,
                 metrics: MetricsLogger, saved_state: dict):
        """`saved_state`: the loop's own state, as the checkpoint it starts from saved it ({} for none)."""
        self.cfg, self.layout, self.engine = cfg, layout, engine
        self.stages, self.run_dir, self.metrics = stages, run_dir, metrics
        self.stage_matrix = (StageMatrix(run_dir, [s.name for s in stages], layout.is_main)
                             if cfg.data.stages else None)
        self.batches = BatchSchedule(cfg)
        self.skipped_ranges = skipped_batch_ranges(cfg)  # 1-based steps
        self.model_config = engine.module.config  # megatron-core's TransformerConfig
        self.vocab_rows = engine.module.vocab_size  # the embedding's rows (the padded vocabulary)
        self.expert_load = ExpertLoadMeter(engine.module, saved_state.get("expert_load"))
        self.sdmoe_layers = sdmoe_modules(engine.module)
        self.update_projector = (UpdateProjector(self.sdmoe_layers)
                                 if self.sdmoe_layers and cfg.sdmoe.project_updates else None)
        self.diagnostics = Diagnostics(engine.module, cfg.moe.diag_rank) if cfg.moe.diag_interval else None
        self.composition = (RouteComposition(engine.module, cfg.moe.diag_position_buckets)
                            if cfg.moe.diag_interval else None)
        self.route_tokens = (RouteTokens(engine.module, self.vocab_rows, max(len(s.domains) for s in stages))
                             if cfg.moe.diag_interval else None)
        self.observers = [o for o in (self.composition, self.route_tokens) if o]  # each is handed the micro-batch
        self.throughput = Throughput(cfg, self.vocab_rows, layout.world_size, engine.module.config.bf16)
        self.profiler = StepProfiler(cfg.train.profile_steps, run_dir, dist.get_rank())
        self.smoother = (SingularitySmoother(cfg.smoothing, engine.module, layout.device,
                                             saved_state.get("smoothing"))
                         if cfg.smoothing.enabled else None)
        # non-finite steps: in a row (train.max_skipped_steps) and in all, as a run that never stopped counts them
        self.skipped_in_a_row = saved_state.get("skipped_in_a_row", 0)
        engine.skipped_steps = saved_state.get("skipped_steps", 0)  # DeepSpeed's count; its own checkpoints keep it

    # -- data order --------------------------------------------------------------------------
    def micro_batch_indices(self, first_sample: int, micro: int) -> list[int]:
        """Micro-batch `micro` of this DP rank within the global batch that starts at
        `first_sample`: micro-batches are dealt to DP ranks in turn, so the global batch (and its
        loss) is the same for every layout."""
        mbs = self.cfg.train.micro_batch_size
        start = first_sample + (micro * self.layout.data_parallel + self.layout.data_parallel_rank) * mbs
        return list(range(start, start + mbs))

    def _forward(self, dataset, first_sample: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked per-token losses [b, s], the mask, and each sample's domain [b]."""
        indices = self.micro_batch_indices(first_sample, micro)
        batch = {k: v.to(self.layout.device) for k, v in get_batch(dataset, indices, self.vocab_rows).items()}
        mask = batch["loss_mask"]
        for observer in self.observers:
            observer.batch = batch
        attention_mask = (document_attention_mask(batch["cu_seqlens"], batch["tokens"].shape[1])
                          if "cu_seqlens" in batch else None)
        per_token = self.engine(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"],
                                loss_mask=mask)
        return per_token.float() * mask, mask, batch["domain"]

    def _loss(self, dataset, first_sample: int, micro: int) -> torch.Tensor:
        losses, mask, _ = self._forward(dataset, first_sample, micro)
        return losses.sum() / mask.sum()

    def _mean_over_dp(self, values: list[torch.Tensor]) -> float:
        mean = torch.stack(values).mean()
        dist.all_reduce(mean, group=ps.get_data_parallel_group())
        return mean.item() / self.layout.data_parallel

    # -- steps -------------------------------------------------------------------------------
    def stage_at(self, step: int) -> Stage:
        return next(s for s in self.stages if s.first_step <= step < s.last_step)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over global batch `step` (0-based)."""
        stage = self.stage_at(step)
        batch = self.batches.size(step)
        accumulation = batch // (self.cfg.train.micro_batch_size * self.layout.data_parallel)
        # DeepSpeed divides the LM loss by its accumulation steps, set from the step's batch (a
        # schedule may change it); the auxiliary losses get the same scale.
        self.engine.set_train_batch_size(batch)
        set_auxiliary_loss_scale(1.0 / accumulation, self.layout.device)
        start = time.perf_counter()  # a step's time includes its basis refresh
        self._refresh_bases(step)
        lr = self.engine.get_lr()[0]  # the LR this step uses; the schedule advances in step()
        if self.update_projector:
            self.update_projector.snapshot()
        losses, first_sample = [], self.batches.first_sample(step) - self.batches.first_sample(stage.first_step)
        for micro in range(accumulation):
            last = micro == accumulation - 1
            for layer in self.sdmoe_layers:  # W = C + U and the gradient routing once per step
                layer.more_micro_batches = not last
            # The optimizer steps on the step's last micro-batch: said outright, as DeepSpeed's own
            # count of micro-batches falls out of step with the batches once their size changes.
            self.engine.set_gradient_accumulation_boundary(last)
            loss = self._loss(stage.train, first_sample, micro)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        update_expert_bias(self.model_config, self.engine.module)
        if self.update_projector:
            self.update_projector.project()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        smoothing = self.smoother.after_step(grad_norm) if self.smoother else {}
        loss = self._mean_over_dp(losses)
        seconds = time.perf_counter() - start
        tokens = batch * self.cfg.data.seq_length
        # DeepSpeed skips the update (and the LR schedule) when the gradient norm is not finite.
        return {"loss": loss, **report_auxiliary_losses(self.model_config, 1.0 / accumulation, step + 1),
                "global_batch": batch, "lr": lr, "grad_norm": grad_norm, "skipped_steps": self.engine.skipped_steps,
                **smoothing, **self.throughput(tokens / seconds), **device_memory()}

    def _refresh_bases(self, step: int) -> None:
        """SD-MoE's bases, every sdmoe.refresh_interval steps (the initial split set the step-0 bases)."""
        if step > 0 and step % self.cfg.sdmoe.refresh_interval == 0:
            with torch.profiler.record_function("sdmoe_refresh_bases"):  # a row of its own in train.profile_steps
                for layer in self.sdmoe_layers:
                    layer.refresh_bases(step)

    def skipped_range(self, step: int) -> tuple[int, int] | None:
        """The train.skip_batches range that holds step `step` (0-based), if any."""
        return next(((first, last) for first, last in self.skipped_ranges if first <= step + 1 <= last), None)

    def skip_batch(self, step: int) -> None:
        """Step `step` without its batch: no forward, no update; the LR schedule moves on, so every
        later step has the LR and the data it would have had, and SD-MoE's bases refresh on time."""
        self._refresh_bases(step)
        with warnings.catch_warnings():  # torch's warning of a schedule step without an optimizer step: meant here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.engine.lr_scheduler.step()

    @torch.no_grad()
    def evaluate(self, dataset, domains: list[str], name: str = "val") -> dict[str, float]:
        """`<name>_loss` on `dataset` (the mean of micro-batch means) and, for a blend,
        `<name>_loss_<domain>` (token-weighted per source dataset)."""
        self.engine.eval()
        per_step = self.cfg.train.micro_batch_size * self.layout.data_parallel
        means, sums = [], torch.zeros(2, len(domains), dtype=torch.float64, device=self.layout.device)
        for micro in range(self.cfg.train.eval_samples // per_step):
            losses, mask, domain = self._forward(dataset, 0, micro)
            means.append(losses.sum() / mask.sum())
            sums[0].index_add_(0, domain, losses.sum(1).double())
            sums[1].index_add_(0, domain, mask.sum(1).double())
        self.engine.train()
        result = {f"{name}_loss": self._mean_over_dp(means)}
        if len(domains) > 1:
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
            result.update({f"{name}_loss_{domain}": (sums[0, d] / sums[1, d]).item()
                           for d, domain in enumerate(domains) if sums[1, d] > 0})
        return result

    def end_of_stage(self, stage: Stage) -> tuple[dict[str, float], dict[str, list[float]]]:
        """L[i][j] for every seen stage j; BWT once there are two rows. With the diagnostics on,
        also `stage_route_neff` per MoE layer: the routes' composition over every seen stage's
        validation tokens, labelled by stage."""
        index = self.stages.index(stage)
        composition = self.composition
        row = []
        for label, seen in enumerate(self.stages[:index + 1]):
            if composition:
                composition.recording, composition.fixed_label = True, label
            row.append(self.evaluate(seen.valid, seen.domains)["val_loss"])
        per_layer = {}
        if composition:
            composition.recording, composition.fixed_label = False, None
            per_layer["stage_route_neff"] = composition.compute()
        bwt, figure = self.stage_matrix.add(index, row)
        if figure:
            self.metrics.log_figure(stage.last_step, "stages", figure)
        result = {f"stage_loss_{seen.name}": loss for seen, loss in zip(self.stages, row)}
        return (result if bwt is None else {**result, "bwt": bwt}), per_layer

    def run(self, start_step: int, load_seconds: float = 0.0) -> str | None:
        """Train to train.max_steps; returns why it stopped early with a checkpoint (a signal, the
        time budget) or None. `load_seconds`: how long the checkpoint it resumed from took to load."""
        tr = self.cfg.train
        bar = tqdm(total=tr.max_steps, initial=start_step, desc="train", unit="step",
                   disable=not self.layout.is_main, dynamic_ncols=True)
        self.engine.train()
        stop = StopRequest(tr.time_budget_minutes, self.layout.device, load_seconds)
        self.start_step = start_step
        if self.stage_matrix:
            self.stage_matrix.rewind(start_step, stage_ends(self.cfg))
        try:  # the bar ends its line before an error is printed
            for step in range(start_step, tr.max_steps):
                stopped, leaving = self._run_step(step, bar, stop)
                if leaving:
                    return stopped
        finally:
            bar.close()
            self.profiler.close()
        return None

    def _run_step(self, step: int, bar, stop: StopRequest) -> tuple[str | None, bool]:
        """Step `step` with its diagnostics, evaluation, metrics and checkpoint; returns why to stop
        early (a signal, the time budget) and whether the run ends here (that, or train.exit_interval)."""
        started = time.perf_counter()
        skipped = self.skipped_range(step)
        if skipped:
            if self.layout.is_main and step + 1 in (skipped[0], self.start_step + 1):
                bar.write(f"steps {skipped[0]}-{skipped[1]}: batches skipped (train.skip_batches), no updates")
            self.skip_batch(step)
            bar.update(1)
        else:
            self._train_and_log(step, bar)
        return self._after_step(step + 1, stop, time.perf_counter() - started)

    def _train_and_log(self, step: int, bar) -> None:
        """Step `step` with its diagnostics, evaluation and metrics."""
        tr = self.cfg.train
        done = step + 1
        diagnosing = self.diagnostics is not None and done % self.cfg.moe.diag_interval == 0
        if diagnosing:
            self.diagnostics.capture_gradients(True)
            self.composition.recording = True
        self.profiler.before_step(done)
        result = self.train_step(step)
        self.profiler.after_step(done)
        per_layer = {}
        if diagnosing:
            per_layer, overlaps = self.diagnostics.compute()
            per_layer["route_neff"] = self.composition.compute()
            self.diagnostics.capture_gradients(False)
            self.composition.recording = False
            self.metrics.log_heatmaps(done, "expert_overlap", overlaps)
        bar.update(1)
        bar.set_postfix(loss=f"{result['loss']:.4f}")
        evaluating = tr.eval_interval > 0 and (done % tr.eval_interval == 0 or done == tr.max_steps)
        stage = self.stage_at(step)
        if evaluating:
            if self.route_tokens:
                self.route_tokens.recording = True
            result.update(self.evaluate(stage.valid, stage.domains))
            if self.route_tokens:
                self.route_tokens.recording = False
                per_layer["val_token_concentration"] = self.route_tokens.concentration()
        testing = done == tr.max_steps and stage.test is not None  # the held-out test set, once
        if testing:
            result.update(self.evaluate(stage.test, stage.test_domains, "test"))
        stage_end = self.stage_matrix is not None and done == stage.last_step
        if stage_end:
            scalars, stage_per_layer = self.end_of_stage(stage)
            result.update(scalars)
            per_layer.update(stage_per_layer)
        if evaluating or diagnosing or stage_end or done % tr.log_interval == 0 or done == tr.max_steps:
            per_layer.update(self.expert_load.collect(per_expert=diagnosing))
            self.metrics.log(done, result, per_layer)
            if self.layout.is_main:
                val = f" | val loss {result['val_loss']:.4f}" if evaluating else ""
                val += f" | test loss {result['test_loss']:.4f}" if testing else ""
                val += f" | BWT {result['bwt']:+.4f}" if "bwt" in result else ""
                bar.write(f"step {done:>5}/{tr.max_steps} | loss {result['loss']:.4f} | aux "
                          f"{result['aux_loss']:.4f} | lr {result['lr']:.2e} | grad norm "
                          f"{result['grad_norm']:.3f} | {result['tokens_per_s']:.0f} tokens/s"
                          + (f" | MFU {result['mfu']:.1%}" if "mfu" in result else "") + val)
        self.skipped_in_a_row = 0 if self.engine.was_step_applied() else self.skipped_in_a_row + 1

    def _state(self) -> dict:
        """The loop's own state, the same on every rank, for the checkpoint (a collective)."""
        state = {"skipped_in_a_row": self.skipped_in_a_row, "skipped_steps": self.engine.skipped_steps,
                 "expert_load": self.expert_load.state()}
        return {**state, "smoothing": self.smoother.state()} if self.smoother else state

    def _after_step(self, done: int, stop: StopRequest, seconds: float) -> tuple[str | None, bool]:
        """The checkpoint after step `done` (1-based) and whether to stop: see _run_step."""
        tr = self.cfg.train
        periodic = bool(tr.save_interval) and done % tr.save_interval == 0
        stopped = stop.after_step(seconds, saving=periodic)  # a collective: every rank calls it
        if done == tr.max_steps:
            stopped = None  # the run is done: a stop request at its last step changes nothing
        diverged = 0 < tr.max_skipped_steps <= self.skipped_in_a_row
        exiting = tr.exit_interval > 0 and done % tr.exit_interval == 0
        if periodic or (done == tr.max_steps and tr.final_checkpoint) or exiting or stopped or diverged:
            started = time.perf_counter()
            save_checkpoint(self.run_dir, done, self.engine, self.layout, self.batches.first_sample(done),
                            tr.keep_checkpoints, self._state())
            stop.saved(time.perf_counter() - started)
        if diverged:
            raise Diverged(f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite gradient norm and "
                           f"were skipped (steps {done - self.skipped_in_a_row + 1}-{done}); the checkpoint of step "
                           f"{done} holds the last good weights: lower train.lr or raise train.warmup_steps, then "
                           "resume")
        return stopped, bool(exiting or stopped)
