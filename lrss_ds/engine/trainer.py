"""The training loop: one whole scene per rank per micro-batch, DeepSpeed doing the engine work.

Read :func:`train_step` first: load, forward, loss, backward, step — with the memory mode entered
as a context manager around forward and backward. :func:`train` is the loop around it: resume,
log, evaluate, checkpoint, stop on SIGTERM. :func:`build_run` assembles the pieces.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TextIO

import torch
import torch.distributed as dist

from lrss_ds.engine import training_checkpoints as checkpoints
from lrss_ds.engine.batchnorm_recalibration import recalibrate_run
from lrss_ds.engine.budget import TrainingBudget
from lrss_ds.engine.comm import all_gather_bytes, any_rank
from lrss_ds.engine.config import ExperimentConfig, save_config
from lrss_ds.engine.device_peaks import PhasePeaks
from lrss_ds.engine.loaders import make_eval_loader, make_train_loader, train_order, worker_batches
from lrss_ds.engine.metrics import ConfusionMatrix
from lrss_ds.engine.synthetic_store import prepare_synthetic_store
from lrss_ds.engine.setup import (
    DistInfo,
    StepParts,
    build_step_parts,
    describe_accelerator,
    init_distributed,
    load_deepspeed_json,
    precision_autocast,
    resolve_memory_mode,
    seed_everything,
)
from lrss_ds.engine.spatial_run import SpatialRun, start_spatial
from lrss_ds.errors import ConfigError, TrainingError

if TYPE_CHECKING:  # the annotations of Run; their modules import late where they are used
    from deepspeed import DeepSpeedEngine

    from lrss_ds.data.samples import SceneSamples
    from lrss_ds.memory import MemoryMode, SavedTensorLedger
    from lrss_ds.memory.device_sim import DeviceMemorySimulator
    from lrss_ds.models.losses import SegmentationLoss

# Exit status after a SIGTERM-triggered checkpoint: 128 + SIGTERM, what a shell reports for a
# process ended by the signal, so a scheduler still sees the run as not finished.
EXIT_PREEMPTED = 128 + signal.SIGTERM
from lrss_ds.units import GIB


@dataclass
class Run(StepParts):
    """Everything the loop needs, built once by :func:`build_run`: the step's parts and the rest.

    Attributes:
        engine / loss_fn / memory_mode / ledger: what :func:`train_step` runs with (:class:`StepParts`).
        config: the experiment.
        dist: rank and world size.
        out: the run directory.
        train_set / val_set: ``SceneSamples`` of the two splits (``val_set`` may be None).
        meta: the static part of ``lrss_meta.json`` (model config, dataset, band statistics).
        class_names / num_classes / ignore_index: from the dataset spec.
        log: rank 0's log file handle (None on other ranks).
        budget: when the loop stops (set by :func:`train`).
        spatial: this rank's place in spatial parallelism (None with ``parallel.spatial: 1``).
    """

    config: ExperimentConfig
    dist: DistInfo
    out: Path
    train_set: SceneSamples
    val_set: SceneSamples | None
    meta: dict[str, Any]
    class_names: list[str]
    num_classes: int
    ignore_index: int
    log: TextIO | None = None
    stop_requested: bool = False
    device_sim: DeviceMemorySimulator | None = None  # with train.simulate_device_memory
    history: list[dict[str, Any]] = field(default_factory=list)
    budget: TrainingBudget | None = None
    spatial: SpatialRun | None = None

    def data_shard(self) -> tuple[int, int]:
        """``(rank, ranks)`` among the data-parallel copies: the ranks of a spatial group read one scene."""
        if self.spatial is not None:
            return self.spatial.data_rank, self.spatial.data_size
        return self.dist.rank, self.dist.world_size

    def log_line(self, line: str, console: bool = True) -> None:
        """Write ``line`` to ``log.txt`` (and the console) on rank 0."""
        if self.dist.rank != 0:
            return
        stamp = time.strftime("%H:%M:%S")
        if self.log is not None:
            self.log.write(f"{stamp} {line}\n")
            self.log.flush()
        if console:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)


def train_step(run: StepParts, batch: dict[str, Any]) -> float | None:
    """One micro-batch: load, forward, loss, backward, step.

    DeepSpeed's ``engine.step()`` applies the optimizer (and the LR schedule) only at a
    gradient-accumulation boundary; between boundaries it just counts the micro-batch. The
    planner's probe and the benchmarks run this same function on parts from
    :func:`~lrss_ds.engine.setup.build_step_parts`, with their measurements around it.

    Args:
        run: the run, or any :class:`~lrss_ds.engine.setup.StepParts`.
        batch: ``image (B, C, H, W)`` (native dtype, e.g. uint8) and ``label (B, H, W)`` uint8.

    Returns:
        The loss, or None when it was not finite on some rank: then no rank runs backward or
        step, so the micro-batch is dropped as if it had not been drawn.
    """
    from lrss_ds.memory import apply_memory_mode

    image = batch["image"].to(run.engine.device, non_blocking=True)
    label = batch["label"].to(run.engine.device, non_blocking=True)
    with apply_memory_mode(run.engine.module, run.memory_mode, run.ledger) as memory:
        with memory.autocast(), precision_autocast(run.engine):
            outputs = run.engine(image)
            loss = run.loss_fn(outputs, label)
        if any_rank(not torch.isfinite(loss.detach()).item()):
            return None
        run.engine.backward(loss)
    run.engine.step()
    return float(loss.detach())


@torch.no_grad()
def validate(run: Run) -> dict[str, Any]:
    """Score the model on this rank's share of the validation scenes; reduce across ranks.

    Each scene is predicted whole (holistic) in eval mode. The confusion matrices of all ranks
    are summed before the metrics are computed, so every rank returns the same numbers.

    Returns:
        ``ConfusionMatrix.compute()`` (per-class iou/precision/recall/f1, miou, mean_f1, oa,
        matrix), plus ``seconds``.
    """
    started = time.perf_counter()
    matrix = ConfusionMatrix(run.num_classes, run.ignore_index, run.class_names)
    loader, count = make_eval_loader(run.val_set, *run.data_shard(), run.config.data.workers, run.engine.device)
    run.engine.eval()
    try:
        with worker_batches(loader) as batches:
            for index, batch in enumerate(batches):
                with torch.autocast(run.engine.device.type, dtype=torch.bfloat16, enabled=run.memory_mode.bf16):
                    with precision_autocast(run.engine):
                        logits = run.engine(batch["image"].to(run.engine.device, non_blocking=True))
                if index < count:  # the rest only keeps ranks in step (see make_eval_loader)
                    matrix.update(logits.argmax(dim=1), batch["label"].to(logits.device, non_blocking=True))
    finally:
        run.engine.train()
    matrix.all_reduce()
    result = matrix.compute()
    result["seconds"] = time.perf_counter() - started
    return result


def memory_now() -> dict[str, float]:
    """Host RSS now and at peak (GiB); the device's peaks are :class:`PhasePeaks`'."""
    import psutil

    return {
        "rss_gib": psutil.Process().memory_info().rss / GIB,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
    }


def per_rank(value: float) -> list[float]:
    """Every rank's ``value``, in rank order (a collective)."""
    import struct

    return [struct.unpack("<d", part)[0] for part in all_gather_bytes(struct.pack("<d", value))]


def peak_rss_per_rank() -> list[float]:
    """Every rank's host peak RSS (GiB), in rank order (a collective)."""
    return per_rank(memory_now()["peak_rss_gib"])


def ledger_summary(ledger: Any) -> dict[str, float]:
    """Peak bytes of saved activations kept on the device and offloaded (GiB), from the ledger."""
    return {
        "saved_device_peak_gib": ledger.peak_device_bytes / GIB,
        "saved_offloaded_peak_gib": ledger.peak_offloaded_bytes / GIB,
    }


def save_checkpoint(run: Run, iteration: int, data_position: int, metrics: dict[str, Any] | None) -> str:
    """Save a checkpoint of every rank; mark the best; prune old tags (rank 0).

    Args:
        run: the run.
        iteration: optimizer steps done.
        data_position: micro-batches this rank has drawn from its sample stream.
        metrics: the evaluation at this iteration, if one was just run.

    Returns:
        The tag.
    """
    root = run.out / "checkpoints"
    client_state = {"iteration": iteration, "data_position": data_position, "history": run.history,
                    "budget_spent": run.budget.spent() if run.budget else None}
    meta = {**run.meta, "iteration": iteration, "metrics": metrics or {}}
    checkpoints.save(run.engine, root, iteration, client_state, meta, run.dist.rank)
    tag = checkpoints.tag_for(iteration)
    if run.dist.rank == 0:
        if metrics and metrics.get("miou") is not None and not math.isnan(metrics["miou"]):
            _, best = checkpoints.read_best(root)
            if metrics["miou"] > best:
                checkpoints.mark_best(root, tag, float(metrics["miou"]))
        checkpoints.prune(root, run.config.train.keep_last)
    checkpoints.barrier()
    return tag


def _metric_line(iteration: int, metrics: dict[str, Any]) -> str:
    """One line: mIoU, mean F1, OA and per-class IoU."""
    per_class = " ".join(
        f"{name}={iou:.3f}" for name, iou in zip(metrics["classes"], metrics["iou"]) if iou == iou  # skip NaN
    )
    return (
        f"eval @ {iteration}: mIoU {metrics['miou']:.4f}  mF1 {metrics['mean_f1']:.4f}  "
        f"OA {metrics['oa']:.4f}  ({metrics['seconds']:.1f} s)  IoU: {per_class}"
    )


def _install_sigterm(run: Run) -> Any:
    """Make SIGTERM ask for a checkpoint and a clean stop at the next iteration boundary."""

    def request_stop(signum: int, frame: Any) -> None:
        run.stop_requested = True

    return signal.signal(signal.SIGTERM, request_stop)


def _batches(loader: Any) -> Iterator[tuple[dict[str, Any], float]]:
    """Yield ``(batch, seconds waited for it)``: time the loop spent blocked on the data.

    Closing the generator (``train`` does, in ``finally``) stops the loader's workers.
    """
    with worker_batches(loader) as iterator:
        while True:
            started = time.perf_counter()
            batch = next(iterator)
            yield batch, time.perf_counter() - started


def train(run: Run, resume: bool) -> int:
    """Train ``run.config.train.iterations`` optimizer steps; evaluate, checkpoint, log.

    An iteration is one of DeepSpeed's ``global_steps``. Under fp16 its loss scaler skips the
    optimizer step of an iteration whose gradients overflowed, and DeepSpeed then leaves the LR
    schedule where it was: the schedule runs ``engine.skipped_steps`` behind the iteration count.
    Each skip is logged, and the count is in every log line and in ``metrics.json``. The device's
    peak memory is taken per phase (train steps, evaluation; :class:`PhasePeaks`).

    Args:
        run: from :func:`build_run`.
        resume: continue from ``OUT/checkpoints/latest`` (model, optimizer, schedule, data
            position and RNG states) when it exists.

    Returns:
        0 when done, :data:`EXIT_PREEMPTED` after a SIGTERM-triggered checkpoint.

    Raises:
        TrainingError: more than ``train.max_nonfinite`` non-finite losses in a row.
    """
    from tqdm import tqdm

    from lrss_ds.memory.device_sim import DeviceMemorySimulator, simulating

    cfg = run.config.train
    engine = run.engine
    if cfg.simulate_device_memory and run.device_sim is None:
        run.device_sim = DeviceMemorySimulator(engine)
    data_position = 0
    spent = None
    if resume:
        state = resume_state(run)
        if state is not None:
            data_position = int(state["data_position"])
            run.history = list(state.get("history", []))
            spent = state.get("budget_spent")
    micro_batch = int(engine.train_micro_batch_size_per_gpu())
    sampler = train_order(len(run.train_set), *run.data_shard(), cfg.seed, data_position, cfg.augment)
    loader = make_train_loader(
        run.train_set, sampler, micro_batch, run.config.data.workers, run.config.data.prefetch, engine.device
    )
    previous_handler = _install_sigterm(run)
    bar = tqdm(
        total=cfg.iterations, initial=engine.global_steps, disable=run.dist.rank != 0, dynamic_ncols=True,
        desc="train", file=sys.stdout,
        # redirected to a file (a batch job's log), redraw rarely instead of at every step
        mininterval=0.1 if sys.stdout.isatty() else 30.0,
    )
    started = time.perf_counter()
    data_wait = 0.0
    nonfinite_in_row = 0
    nonfinite_total = 0
    first_iteration = engine.global_steps  # a resumed run starts past 0
    train_halo_bytes = 0  # bytes this rank sent in halo exchanges during training steps
    losses_this_iteration: list[float] = []
    last_eval: dict[str, Any] | None = None
    peaks = PhasePeaks()
    exit_code = 0
    run.log_line(describe_accelerator())
    run.budget = budget = TrainingBudget.from_config(cfg, spent)
    run.log_line(
        f"training {run.meta['model']['name']} for {budget.describe()} on {run.dist.world_size} rank(s), "
        f"{engine.gradient_accumulation_steps()} micro-batch(es) of {micro_batch} per rank per iteration, "
        f"memory mode {run.memory_mode}"
    )
    if run.spatial is not None:
        run.log_line(run.spatial.describe())
    batches = _batches(loader)
    budget.start()
    stopped_by = budget.stop_reason(engine.global_steps)
    try:
        while stopped_by is None:
            if any_rank(run.stop_requested):
                tag = save_checkpoint(run, engine.global_steps, data_position, None)
                run.log_line(f"SIGTERM: saved {tag} at iteration {engine.global_steps}; rerun with --resume to continue")
                exit_code = EXIT_PREEMPTED
                break
            batch, waited = next(batches)
            data_wait += waited
            data_position += 1
            steps_before = engine.global_steps
            lr = engine.get_lr()[0]  # the rate this optimizer step uses (the schedule moves after it)
            skipped_before = engine.skipped_steps
            halo_before = run.spatial.group.halo_bytes_sent if run.spatial is not None else 0
            with peaks.phase("train"), simulating(run.device_sim):
                loss = train_step(run, batch)
            if run.spatial is not None:  # training traffic only: evaluation forwards exchange halos too
                train_halo_bytes += run.spatial.group.halo_bytes_sent - halo_before
            if loss is not None and run.spatial is not None:
                loss = run.spatial.scene_loss(loss)  # the step returned this band's share
            if loss is None:
                nonfinite_in_row += 1
                nonfinite_total += 1
                run.log_line(f"warning: non-finite loss on scene(s) {batch['scene']}; skipped ({nonfinite_in_row} in a row)")
                if nonfinite_in_row > cfg.max_nonfinite:
                    raise TrainingError(
                        "loss", f"{nonfinite_in_row} non-finite losses in a row (train.max_nonfinite="
                        f"{cfg.max_nonfinite}); lower optim.lr or check the data",
                    )
                continue
            nonfinite_in_row = 0
            losses_this_iteration.append(loss)
            if engine.global_steps == steps_before:
                continue  # inside gradient accumulation
            iteration = engine.global_steps
            mean_loss = sum(losses_this_iteration) / len(losses_this_iteration)
            losses_this_iteration = []
            skipped = engine.skipped_steps > skipped_before
            record = {"iteration": iteration, "loss": mean_loss, "lr": lr, "skipped": skipped}
            run.history.append(record)
            if skipped:
                run.log_line(
                    f"warning: the fp16 loss scaler skipped the optimizer step of iteration {iteration} (gradient "
                    f"overflow); {engine.skipped_steps} skipped so far, the LR schedule is that many steps behind",
                    console=False,
                )
            stats = {**memory_now(), **ledger_summary(run.ledger)}
            device = peaks.take("train")
            bar.set_postfix(
                loss=f"{mean_loss:.4f}", rss=f"{stats['rss_gib']:.2f}G",
                **({"dev_alloc": f"{device['max_allocated_gib']:.2f}G"} if isinstance(device, dict) else {}),
                # the ledger: peak saved activations kept on the device / offloaded, this step
                saved=f"{stats['saved_device_peak_gib'] * 1024:.0f}/{stats['saved_offloaded_peak_gib'] * 1024:.0f}M",
                data_wait=f"{data_wait:.1f}s", refresh=False,
            )
            bar.update(iteration - bar.n)
            if iteration % cfg.log_every == 0:
                run.log_line(
                    f"it {iteration} loss {mean_loss:.4f} lr {record['lr']:.3g} data_wait {data_wait:.2f}s "
                    f"rss {stats['rss_gib']:.2f}G peak {stats['peak_rss_gib']:.2f}G saved(dev/off) "
                    f"{stats['saved_device_peak_gib']:.3f}/{stats['saved_offloaded_peak_gib']:.3f}G "
                    f"skipped {engine.skipped_steps} {PhasePeaks.line(device)}",
                    console=False,
                )
            _monitor(engine, [("Train/loss", mean_loss, iteration), ("Train/data_wait_s", data_wait, iteration)])
            metrics = None
            stopped_by = budget.stop_reason(iteration)
            last = stopped_by is not None
            if last:
                run.log_line(f"stopped by {stopped_by} at iteration {iteration} ({budget.describe()})")
                if cfg.recalibrate_bn:
                    run.log_line(f"recalibrated BatchNorm statistics over {recalibrate_run(run)} batch(es) on rank 0")
            if run.val_set is not None and ((cfg.eval_every and iteration % cfg.eval_every == 0) or last):
                with peaks.phase("eval"):
                    metrics = last_eval = validate(run)
                run.history[-1]["val_miou"] = metrics["miou"]
                run.log_line(f"{_metric_line(iteration, metrics)}  {PhasePeaks.line(peaks.take('eval'))}")
                _monitor(engine, [("Val/mIoU", metrics["miou"], iteration), ("Val/OA", metrics["oa"], iteration)])
            if (cfg.checkpoint_every and iteration % cfg.checkpoint_every == 0) or last:
                tag = save_checkpoint(run, iteration, data_position, metrics)
                run.log_line(f"saved checkpoint {tag}", console=False)
                _debug_kill_after_checkpoint(iteration)
    finally:
        try:
            batches.close()
        except Exception as error:  # noqa: BLE001 - must not replace the error being raised
            run.log_line(f"warning: stopping the data loader workers failed: {error}")
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
    seconds = time.perf_counter() - started
    digests = parameter_digests(engine)
    rank_peaks = peak_rss_per_rank()
    steps_run = max(1, engine.global_steps - first_iteration)
    halo_mib = per_rank(train_halo_bytes / steps_run / (1 << 20)) if run.spatial is not None else None
    if run.dist.rank == 0:
        _write_metrics(run, last_eval, seconds, data_wait, nonfinite_total, exit_code, digests, peaks, rank_peaks,
                       halo_mib)
    if exit_code == 0 and last_eval is not None:
        run.log_line(f"done: {engine.global_steps} iterations in {seconds:.1f} s; final {_metric_line(engine.global_steps, last_eval)}")
    return exit_code


def resume_state(run: Run) -> dict[str, Any] | None:
    """Load the newest intact checkpoint of the run directory, saying which and what was skipped.

    Returns:
        Its ``client_state``, or None when the run has no checkpoint yet.

    Raises:
        TrainingError: every checkpoint is damaged, or the newest intact one was trained with
            another model, class list or input dtype than this run's store gives.
    """
    root = run.out / "checkpoints"
    tag, broken = checkpoints.find_resumable(root)
    for note in broken:
        run.log_line(f"--resume: skipping {note}")
    if tag is None:
        if broken:
            raise TrainingError(
                root, f"no intact checkpoint to resume ({'; '.join(broken)}); train into a new --output"
            )
        run.log_line("--resume: no checkpoint yet, starting from scratch")
        return None
    differences = checkpoints.resume_differences(root / tag, run.meta)
    if differences:
        raise TrainingError(
            root / tag, f"cannot resume: {', '.join(differences)} (data.store {run.config.data.store}); resume with "
            "the store and model it was trained with, or train into a new --output",
        )
    state = checkpoints.load(run.engine, root, run.dist.rank, tag=tag)
    newest = " (the newest intact one)" if broken else ""
    run.log_line(f"resumed from {tag}{newest} (iteration {run.engine.global_steps})")
    return state


def _monitor(engine: Any, events: list[tuple[str, float, int]]) -> None:
    """Send events to DeepSpeed's monitors (TensorBoard/CSV/W&B as the JSON enables them)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled and engine.global_rank == 0:
        monitor.write_events([(name, float(value), int(step)) for name, value, step in events])


def _debug_kill_after_checkpoint(iteration: int) -> None:
    """Fault injection for the resume test: SIGKILL this process after checkpoint ``iteration``.

    Set ``LRSS_DS_KILL_AFTER_CHECKPOINT=<iteration>``; nothing else runs after the kill, as in a
    node failure, so the test proves a resume needs nothing but the checkpoint.
    """
    target = os.environ.get("LRSS_DS_KILL_AFTER_CHECKPOINT")
    if target is not None and int(target) == iteration:
        os.kill(os.getpid(), signal.SIGKILL)


def parameter_digests(engine: Any) -> list[str] | None:
    """SHA-256 of every rank's parameters (a collective): data parallelism keeps them equal.

    Returns:
        One hex digest per rank, or None under ZeRO-3 (each rank holds only its partition).
    """
    import hashlib

    if engine.zero_optimization_stage() >= 3:
        return None
    digest = hashlib.sha256()
    for name, param in sorted(engine.module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return [part.hex() for part in all_gather_bytes(digest.digest())]


def _write_metrics(
    run: Run, final: dict[str, Any] | None, seconds: float, data_wait: float, nonfinite: int, exit_code: int,
    digests: list[str] | None, peaks: PhasePeaks, rank_peaks: list[float], halo_mib: list[float] | None,
) -> None:
    """Write ``OUT/metrics.json``: final evaluation, best checkpoint, loss curve, time, memory."""
    from lrss_ds.memory.device_sim import simulated_summary

    best_tag, best_miou = checkpoints.read_best(run.out / "checkpoints")
    losses = [h["loss"] for h in run.history]
    data = {
        "iteration": run.engine.global_steps,
        "finished": exit_code == 0,
        "world_size": run.dist.world_size,
        "final": final,
        "best": {"tag": best_tag, "miou": best_miou if best_tag else None},
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "history": run.history,
        "seconds": seconds,
        "data_wait_seconds": data_wait,
        "nonfinite_skipped": nonfinite,
        # iterations whose optimizer step the fp16 loss scaler skipped (DeepSpeed's own counter)
        "skipped_steps": run.engine.skipped_steps,
        "memory": {**memory_now(), "peak_rss_gib_per_rank": rank_peaks, **ledger_summary(run.ledger), "device": peaks.summary(),
                   **simulated_summary(run.device_sim)},
        "memory_mode": run.memory_mode.to_dict(),
        **({"spatial": {"halo_mib_sent_per_iteration_per_rank": halo_mib}} if halo_mib is not None else {}),
        **(run.budget.summary() if run.budget else {}),
        # equal on every rank unless data parallelism broke (None under ZeRO-3)
        "parameter_sha256_per_rank": digests,
    }
    checkpoints.write_json(run.out / "metrics.json", data)


def build_run(config: ExperimentConfig, out: Path) -> Run:
    """Initialise distributed, read the store, build model, loss and engine; write config files.

    Args:
        config: the experiment (``train.output`` already set to ``out``).
        out: the run directory (created).

    Returns:
        The :class:`Run`.

    Raises:
        ConfigError / StoreError: from the config, the store, the model or loss builders.
    """
    import deepspeed
    from lrss_ds.data.samples import SceneSamples
    from lrss_ds.data.store import TileStore
    from lrss_ds.models import build_model, load_pretrained

    # DeepSpeed logs every step at INFO; keep its warnings, our own lines carry the progress.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    dist_info = init_distributed()
    seed_everything(config.train.seed + dist_info.rank)
    out.mkdir(parents=True, exist_ok=True)
    if config.data.synthetic is not None:
        if dist_info.rank == 0:  # one writer; idempotent, so a rerun reuses the store
            prepare_synthetic_store(config.data, log=lambda line: None)
        dist.barrier()
    ds_config = load_deepspeed_json(config)
    memory_mode = resolve_memory_mode(config)

    store = TileStore.open(config.data.store)
    spec = store.spec
    train_scenes = store.scenes(config.data.train_split)
    if not train_scenes:
        raise ConfigError("data.train_split", f"split {config.data.train_split!r} of {config.data.store} has no scenes")
    input_dtype = store.pixel_dtype  # the store's one pixel type; refuses a store that mixes types
    val_scenes = store.scenes(config.data.val_split) if config.data.val_split else []
    bands = store.shape(train_scenes[0])[0]
    band_mean, band_std = store.band_stats()
    options = store_owned_options(config, bands, len(spec.classes))
    model = build_model(
        config.model.name, num_classes=len(spec.classes), in_channels=bands,
        band_mean=band_mean, band_std=band_std, **options,
    )
    check_sample_sizes(config, model, [store.shape(s)[1:] for s in train_scenes],
                       int(ds_config.get("train_micro_batch_size_per_gpu", 1)))
    if config.model.pretrained:
        load_pretrained(model, config.model.pretrained)
    spatial = start_spatial(config, model, ds_config, [(s, store.shape(s)[1]) for s in train_scenes + val_scenes])
    parts = build_step_parts(model, config, ds_config, len(spec.classes), spec.ignore_index,
                             mpu=spatial.topology if spatial else None)
    if spatial is not None:
        parts.loss_fn = spatial.loss(parts.loss_fn)

    patch = {"patch_size": config.data.patch_size, "patches_per_scene": config.data.patches_per_scene}
    train_set = SceneSamples(
        config.data.store, config.data.train_split, mode=config.data.mode, seed=config.train.seed,
        **(patch if config.data.mode == "patch" else {}),
    ) if spatial is None else spatial.samples(config.data.store, config.data.train_split)
    val_set = None
    if val_scenes:
        val_set = (SceneSamples(config.data.store, config.data.val_split, mode="whole") if spatial is None
                   else spatial.samples(config.data.store, config.data.val_split))
    meta = {
        "model": model.config(),
        "dataset": spec.to_dict(),
        "input_dtype": str(input_dtype),
        "band_mean": list(band_mean),
        "band_std": list(band_std),
        "store": str(Path(config.data.store).resolve()),
        "memory_mode": memory_mode.to_dict(),
    }
    log = None
    if dist_info.rank == 0:
        save_config(config, out / "config.yaml")
        checkpoints.write_json(out / "ds_config.json", ds_config)
        log = open(out / "log.txt", "a")
    return Run(
        engine=parts.engine, loss_fn=parts.loss_fn, memory_mode=parts.memory_mode, ledger=parts.ledger,
        config=config, dist=dist_info, out=out, train_set=train_set, val_set=val_set, meta=meta,
        class_names=list(spec.classes), num_classes=len(spec.classes), ignore_index=spec.ignore_index, log=log,
        spatial=spatial,
    )


def store_owned_options(config: ExperimentConfig, bands: int, num_classes: int) -> dict[str, Any]:
    """``model.options`` without the keys the store decides (``in_channels``, ``num_classes``).

    Raises:
        ConfigError: the user gave one of them with a value other than the store's.
    """
    options = dict(config.model.options)
    for key, value in (("in_channels", bands), ("num_classes", num_classes)):
        if key in options:
            given = options.pop(key)
            if given != value:
                raise ConfigError(
                    config.where(f"model.options.{key}"),
                    f"{given} collides with the store's {value} (data.store {config.data.store}); the store "
                    "decides it, remove the key",
                )
    return options


def check_sample_sizes(config: ExperimentConfig, model: Any, sizes: list[tuple[int, int]], micro_batch: int) -> None:
    """Refuse training samples too small for the model before the first step.

    A model pads its input to ``model.pad_multiple``, the stride of its coarsest feature map;
    a micro-batch of one sample no larger than that leaves one value per channel there, which
    BatchNorm cannot normalise in training.

    Args:
        config: the experiment (``data.mode``, ``data.patch_size``).
        model: the built model.
        sizes: ``(height, width)`` of each training scene.
        micro_batch: samples per micro-batch.

    Raises:
        ConfigError: naming the smallest sample and the size needed.
    """
    if micro_batch > 1:
        return
    multiple = int(getattr(model, "pad_multiple", 1))
    patch = config.data.patch_size if config.data.mode == "patch" else None
    samples = [(min(h, patch), min(w, patch)) if patch else (h, w) for h, w in sizes]
    too_small = [(h, w) for h, w in samples if h <= multiple and w <= multiple]
    if too_small:
        height, width = too_small[0]
        key = "data.patch_size" if patch and patch <= multiple else "data.store"
        raise ConfigError(
            config.where(key),
            f"a {height}x{width} training sample is too small for {config.model.name}: its coarsest feature map "
            f"(1/{multiple}) would hold one value per channel, which BatchNorm cannot normalise; use samples "
            f"larger than {multiple} px on a side",
        )


def check_output(out: Path, resume: bool) -> None:
    """Refuse to start a fresh run over a run directory that already has checkpoints.

    Raises:
        OutputExistsError: ``OUT/checkpoints`` has a checkpoint and ``--resume`` was not given.
    """
    from lrss_ds.errors import OutputExistsError

    root = out / "checkpoints"
    if not resume and (checkpoints.latest_tag(root) is not None or checkpoints.tags(root)):
        raise OutputExistsError(out, "already holds checkpoints; pass --resume to continue it or choose another --output")


def make_run_dir(out: Path) -> bool:
    """Create the run directory (or take the existing one) and check it can be written.

    Returns:
        True when this process created it (so it may remove it again after a failure).

    Raises:
        TrainingError: it cannot be created or written (read-only file system, no permission).
    """
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as error:
        raise TrainingError(out, f"cannot create the run directory: {error.strerror or error}") from None
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise TrainingError(out, f"cannot write in the run directory: {error.strerror or error}") from None
    return created


def remove_if_nothing_kept(out: Path) -> None:
    """Remove a run directory this run created when a failure left no checkpoint in it."""
    if not checkpoints.tags(out / "checkpoints"):
        shutil.rmtree(out, ignore_errors=True)


def run_training(config: ExperimentConfig, resume: bool = False) -> int:
    """Build the run from ``config`` and train it (the body of ``train.py`` and ``lrss-ds train``).

    Args:
        config: the experiment; ``train.output`` is the run directory.
        resume: continue from the run directory's latest checkpoint.

    Returns:
        The exit status (0, or :data:`EXIT_PREEMPTED` after SIGTERM).
    """
    out = Path(config.train.output)
    check_output(out, resume)
    created = make_run_dir(out)
    try:
        run = build_run(config, out)
        try:
            return train(run, resume)
        finally:
            if run.log is not None:
                run.log.close()
    except BaseException:
        if created:  # a failed first attempt leaves no empty run directory to puzzle over
            remove_if_nothing_kept(out)
        raise
