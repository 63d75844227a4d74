"""lrss_ds: holistic semantic segmentation of whole large remote-sensing images with DeepSpeed.

The package follows the data path: ``data`` (GeoTIFF -> Zarr tile store -> samples) ->
``models`` (networks, losses) -> ``memory`` (checkpointing, offload, the ledger) -> ``engine``
(DeepSpeed training, evaluation, prediction) -> ``cli``. Imports flow that way only.
"""

__version__ = "0.1.0"
