"""The driver side of a run: everything that happens in the process that runs ``ega-ray distill`` (or a job's
driver, or a Tune trial's driver), before, around and after Ray Train's ``fit()``: the checks that need no
cluster (``preflight``), every node checked (``nodes``), a resume's checkpoints (``checkpoints``), Ray Data and
the TorchTrainer (``launch``), what a run records and prints (``tracking``), the run folder's files
(``outputs``) and ``ega-ray cache-teacher`` (``teacher_cache``). It may import the worker side (the function
the workers run); the worker side never imports it."""
