"""The dataset formats ``ega-ray prepare`` converts, one file each, registered in ``FORMATS`` by name.

A format is an opener, ``open_<name>(src, max_pixels) -> Source``, decorated with ``@FORMATS.register(name,
…)``: it checks the layout of ``src`` and returns the splits as streams of rows (image bytes, label), which
``ega_ray.data.prepare`` writes. Adding a format: a file here plus its import below."""

from ega_ray.data.formats import cifar100, digits, imagefolder, stl10, tinyimagenet  # noqa: F401 - registers each
from ega_ray.data.formats.base import FORMATS, BadImage, Format, PrepareError, Row, Source, Split

__all__ = ["FORMATS", "BadImage", "Format", "PrepareError", "Row", "Source", "Split"]
