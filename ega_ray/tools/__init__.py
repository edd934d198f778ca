"""Measurements run beside training rather than in it: the gradient noise scale (``noise_scale``, used by
``bench/noise_scale.py``)."""
