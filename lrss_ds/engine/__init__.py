"""DeepSpeed training, evaluation, prediction: the engine layer (see ``trainer.train_step`` first).

Training: ``config`` (experiment YAML) -> ``setup`` (distributed, DeepSpeed JSON, optimizer,
LR schedule) -> ``trainer`` (the loop) with ``loaders`` (sample order, DataLoader),
``checkpoints`` (layout, resume, retention), ``comm`` (collectives on the backend's device),
``device_peaks`` (device memory per phase), ``budget`` (when the loop stops: iterations, CPU or
wall seconds) and ``batchnorm_recalibration`` (BatchNorm statistics of the final weights); entry points ``lrss_ds.train`` (deepspeed
launcher), ``train_cli`` (``lrss-ds train``) and ``demo`` (``lrss-ds demo``, the main job).

Planning: ``plan`` (fit the measured peaks per memory mode, recommend one) measures ``probe``
(the trainer's step on an engine from ``setup.build_step_parts``, with its peaks) in fresh
processes of ``isolated`` (``run_isolated``, also what every benchmark configuration runs in);
``plan_cli`` is ``lrss-ds plan``.

Prediction: ``lrss_ds.data.rasters`` (scenes read window by window) -> ``inference`` (the
``Predictor``: one holistic forward, or blended sliding windows) -> ``prediction_writer``
(cloud-optimised GeoTIFFs); ``predict`` (``lrss-ds predict``) and ``evaluate``
(``lrss-ds evaluate``) are the command lines, sharing ``cli_inputs`` (``--input``, ``--device``).
"""
