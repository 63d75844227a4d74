"""Spatial prediction: the N ranks of a group predict one scene in bands of rows; the group's first rank writes it.

``lrss-ds predict --spatial N`` under the ``deepspeed`` launcher (or ``torchrun``) with a world
of ``N x copies`` ranks: consecutive groups of ``N`` ranks
(:class:`~lrss_ds.engine.spatial_groups.SpatialTopology`) take scenes ``copy, copy + copies,
...`` of the sorted list, as whole-scene ranks do. Within a group, rank ``r`` reads only band
``r`` of the scene's rows (:func:`~lrss_ds.parallel.band_bounds` with the network's total
stride; windowed reads from the GeoTIFF or tile store) and runs the spatial version of the
model (:func:`~lrss_ds.parallel.spatialize`): halo convolutions, BatchNorm with its running
statistics (eval mode: no communication), EHSNet's ECR over the whole scene. Its logits stay at
the network's output stride; one low-resolution row from each neighbour (the rows bilinear
upsampling reads across a band boundary) makes the band's full-resolution rows exactly the
one-rank rows, which are upsampled, turned into classes (and probabilities) and nodata-masked
:data:`CHUNK_ROWS` rows at a time. The group's first rank hands its own rows, then every other
band's, to :func:`~lrss_ds.engine.prediction_writer.write_prediction` (temporary name, COG copy,
rename); the other ranks send theirs to it chunk by chunk through ``lrss_ds.engine.comm``, so
no rank ever holds more than one chunk of another band, nor the ``K x H x W`` probabilities.

Differences from one-rank holistic prediction (``Predictor``), and why:

* no :func:`~lrss_ds.memory.banded_inference.banded_eval`: it does not compose with the spatial
  layers. It would run an HRNet's front in bands of a band's rows with halo convolutions (each
  sub-band would take its row table from the sub-band, and ranks with different numbers of
  sub-bands would run different numbers of collectives), its streamed ECR normalises keys and
  picks hard positions over one band only, and its row-wise upsampling clamps at the band's
  edge. Instead each HRNet's front (stem, ``layer1``, ``transition1``: the largest maps) runs in
  row bands of a block holding the band and the rows the front reads across its boundaries,
  fetched once (:func:`~lrss_ds.parallel.banded_front.banded_fronts`); stages 2-4, EHSNet's LRD,
  heads and ECR and HRNet-FCN's head run on the whole band with their halo layers;
* BatchNorm is not folded into the convolutions (``folded_batchnorm`` traces and checks the
  fold on a corner of the input, which on halo layers is a collective run of its own); the
  one-rank fold moves logits by float rounding only;
* ``--bf16`` is refused: spatial bfloat16 has not been compared with one rank.

A rank that fails mid-scene leaves the others waiting on their next transfer; the ``deepspeed``
launcher (and ``torchrun``) then ends them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lrss_ds.data.rasters import RasterSource
from lrss_ds.engine import comm
from lrss_ds.engine.inference import finish_rows
from lrss_ds.engine.spatial_groups import SpatialTopology
from lrss_ds.errors import LrssError
from lrss_ds.memory.banded_inference import PIXEL_BAND_ROWS
from lrss_ds.models.losses import upsample_rows
from lrss_ds.parallel import SpatialGroup, band_bounds, halo_rows, spatialize
from lrss_ds.parallel.banded_front import banded_fronts
from lrss_ds.parallel.convert import refusal

OPTION = "--spatial"
ONE_RANK = f"use {OPTION} 1"

CHUNK_ROWS = PIXEL_BAND_ROWS
"""Full-resolution rows upsampled, finished and sent at a time (the one-rank predictor's strip)."""

T = TypeVar("T")
Strip = tuple[int, np.ndarray, "np.ndarray | None"]


def check_spatial(spatial: int, world_size: int, window: int | None, bf16: bool) -> None:
    """Refuse ``--spatial`` settings that cannot run, before any model is built or group opened.

    Args:
        spatial: ``--spatial``.
        world_size: ranks of the job.
        window: ``--window`` (None: the model's default).
        bf16: ``--bf16``.

    Raises:
        LrssError: (naming ``--spatial``) in one line.
    """
    if spatial < 1:
        raise LrssError(OPTION, f"must be >= 1, got {spatial}")
    if spatial == 1:
        return
    if world_size % spatial:
        raise LrssError(OPTION, f"{spatial} does not divide the {world_size} ranks of the job (launch {OPTION} x "
                                "copies ranks)")
    if window:
        raise LrssError(OPTION, f"splits whole scenes into bands; sliding-window prediction (--window {window}) "
                                f"does not split over ranks: use --window 0 or {ONE_RANK}")
    if bf16:
        raise LrssError(OPTION, f"spatial prediction in bfloat16 has not been compared with one rank; drop --bf16 "
                                f"or {ONE_RANK}")


def chunks(start: int, stop: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` of a band cut into :data:`CHUNK_ROWS`-row pieces, top to bottom."""
    return [(row, min(row + CHUNK_ROWS, stop)) for row in range(start, stop, CHUNK_ROWS)]


class SpatialPredictor:
    """One rank of a group that predicts scenes in bands: its own band's rows, and the writer's gathering.

    The group's first rank is the writer: :meth:`strips` (what ``write_prediction`` reads)
    yields the whole scene, its own band computed here and the others' received. Every other
    rank calls :meth:`send` for the same scene at the same time.

    Args:
        model: the spatialized eval-mode model, on ``device``.
        num_classes: K.
        ignore_index: class written where the input is nodata (None: never).
        group: the spatial group of this rank's scene.
        topology: the process groups (which copy of the scene stream this group is).
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, num_classes: int, ignore_index: int | None, group: SpatialGroup,
                 topology: SpatialTopology, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.group = group
        self.topology = topology
        self.device = torch.device(device)
        self.row_progress: Callable[[int], Any] | None = None

    @property
    def writes(self) -> bool:
        """This rank writes its group's maps (the group's first rank)."""
        return self.group.first

    def share(self, items: Sequence[T]) -> list[T]:
        """This group's items: ``copy, copy + copies, ...`` (every rank of the group gets the same)."""
        return list(items[self.topology.get_data_parallel_rank() :: self.topology.data])

    def bands(self, source: RasterSource) -> list[tuple[int, int]]:
        """Every rank's rows ``(start, stop)`` of ``source``, top to bottom."""
        return band_bounds(source.height, self.group.size, int(self.model.pad_multiple))

    def strips(self, source: RasterSource, probabilities: bool = False) -> Iterator[Strip]:
        """The whole scene's rows, top to bottom: this band's, then each other rank's as it sends them.

        Only the group's first rank calls it; the others call :meth:`send` at the same time.

        Yields:
            ``(row_off, classes (h, W) uint8, probs (K, h, W) float32 or None)``.
        """
        if not self.writes:
            raise RuntimeError(f"spatial rank {self.group.rank} does not write; call send()")
        bounds = self.bands(source)
        for strip in self._band_strips(source, bounds[self.group.rank], probabilities):
            yield self._progress(strip)
        exchange = self.group.comm.exchange  # lrss_ds.engine.comm's: on the accelerator's device
        classes_like = torch.empty(0, dtype=torch.uint8)
        probs_like = torch.empty(0, dtype=torch.float32)
        for peer in range(1, self.group.size):
            for start, stop in chunks(*bounds[peer]):
                rows = stop - start
                classes = exchange({}, {peer: (rows, source.width)}, classes_like, self.group.group)[peer]
                probs = None
                if probabilities:
                    shape = (self.num_classes, rows, source.width)
                    probs = exchange({}, {peer: shape}, probs_like, self.group.group)[peer].numpy()
                yield self._progress((start, classes.numpy(), probs))

    def send(self, source: RasterSource, probabilities: bool = False) -> None:
        """Predict this rank's band of ``source`` and send its rows to the group's first rank, chunk by chunk."""
        if self.writes:
            raise RuntimeError("the group's first rank writes the scene; call strips()")
        bounds = self.bands(source)
        exchange = self.group.comm.exchange  # lrss_ds.engine.comm's: on the accelerator's device
        for _, classes, probs in self._band_strips(source, bounds[self.group.rank], probabilities):
            exchange({0: torch.from_numpy(classes)}, {}, torch.empty(0, dtype=torch.uint8), self.group.group)
            if probs is not None:
                exchange({0: torch.from_numpy(probs)}, {}, torch.empty(0), self.group.group)

    def peaks_per_rank(self, peak_gib: float) -> list[float]:
        """Every rank's peak resident set over its scene, in band order (a collective over the group).

        Args:
            peak_gib: this rank's peak (the writer's over writing, the others' over sending).
        """
        mine = torch.zeros(self.group.size, dtype=torch.float64)
        mine[self.group.rank] = peak_gib
        return [round(float(v), 4) for v in self.group.comm.all_reduce(mine, group=self.group.group)]

    def close(self) -> None:
        """Close every process group of the job (after the last scene and barrier, every rank).

        Why: a rank that exits with its gloo groups open can abort in the interpreter's
        finalisation ("terminate called without an active exception", exit -6: gloo's worker
        threads still hold tensors; pytorch/pytorch#190489), which the launcher reports as a
        failed job after the maps are written; the spatial groups add such groups.
        """
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def _progress(self, strip: Strip) -> Strip:
        if self.row_progress is not None:
            self.row_progress(strip[1].shape[0])
        return strip

    def _band_strips(self, source: RasterSource, band: tuple[int, int], probabilities: bool) -> Iterator[Strip]:
        """This band's rows in :data:`CHUNK_ROWS`-row strips (the forward and the logit halo are collectives).

        Args:
            source: the scene.
            band: this rank's rows ``(start, stop)``.
            probabilities: also yield probabilities.
        """
        start, stop = band
        image = source.read(start, 0, stop - start, source.width)
        block, factor, offset, padded_width = self._band_logits(image)
        rows_up = block.shape[2] * factor  # the upsampled block: the band's padded rows and the halo's
        for first, last in chunks(start, stop):
            with torch.inference_mode():
                scores = upsample_rows(block, (rows_up, padded_width), (rows_up, source.width),
                                       offset + first - start, offset + last - start)[0]
            classes, probs = finish_rows(scores, image[:, first - start : last - start], source.nodata,
                                         self.ignore_index, probabilities, are_probs=False)
            yield first, classes, probs

    def _band_logits(self, image: np.ndarray) -> tuple[Tensor, int, int, int]:
        """The band's logits at the output stride with one row of each neighbour's (collectives).

        Args:
            image: ``(C, h, W)`` this band's input rows, native dtype.

        Returns:
            ``(block (1, K, r, w) float32, factor, offset, padded_width)``: the logits of the band
            and of the neighbours' boundary rows, the upsampling factor (the output stride), the
            full-resolution rows of the upsampled block above the band's first row, and the
            padded width the network saw.
        """
        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)
        # the model's own eval output upsamples the whole band at once (K x h x W); the dict
        # keeps the logits at the output stride, which are upsampled here a chunk at a time
        self.model.defer_upsampling = True
        try:
            with torch.inference_mode(), banded_fronts(self.model, self.group):
                out = self.model(x)
        finally:
            del self.model.defer_upsampling
        logits = out["logits"].float()
        padded_rows, padded_width = (int(v) for v in out["padded_size"])
        if padded_rows % logits.shape[2]:
            raise RuntimeError(f"band of {padded_rows} padded rows gave {logits.shape[2]} rows of logits")
        factor = padded_rows // logits.shape[2]
        with torch.inference_mode():
            # bilinear upsampling by an integer factor reads one low-resolution row across each
            # boundary; at the scene's edges the block ends where the scene does (the same clamping)
            block, missing_top, _ = halo_rows(logits, self.group, 1, 1)
        return block, factor, (1 - missing_top) * factor, padded_width


def start_spatial_prediction(
    spatial: int,
    model: nn.Module,
    meta: dict[str, Any],
    sources: Sequence[RasterSource],
    device: str | torch.device = "cpu",
) -> SpatialPredictor:
    """Open the spatial groups and turn ``model`` into its spatial version (in place), every rank at once.

    Call after :func:`check_spatial`, on every rank at the same point (new process groups are
    collective), with the model as loaded (before any memory layer: its refusal says why).

    Args:
        spatial: ranks per scene (``--spatial``).
        model: the checkpoint's eval-mode model.
        meta: checkpoint metadata (``model.num_classes``, the dataset's ``ignore_index``).
        sources: every scene of the job (each must hold a band per rank).
        device: where the model runs.

    Returns:
        this rank's :class:`SpatialPredictor`.

    Raises:
        LrssError: (naming ``--spatial``) the model has no spatial version, or a scene is too
            short for ``spatial`` bands.
    """
    problem = refusal(model, OPTION, ONE_RANK)
    if problem is not None:
        raise LrssError(OPTION, problem)
    multiple = int(model.pad_multiple)
    for source in sources:
        try:
            band_bounds(source.height, spatial, multiple)
        except ValueError as error:
            raise LrssError(OPTION, f"{source.where}: {error}") from None
    topology = SpatialTopology(spatial)
    group = SpatialGroup(comm, dist.get_rank(topology.spatial_group), spatial, topology.spatial_group)
    spatialize(model, group, OPTION, ONE_RANK)
    dataset = meta.get("dataset") or {}
    ignore = dataset.get("ignore_index", 255)
    return SpatialPredictor(
        model=model,
        num_classes=int(meta["model"]["num_classes"]),
        ignore_index=ignore if ignore is not None and 0 <= int(ignore) <= 255 else None,
        group=group,
        topology=topology,
        device=device,
    )
