"""Students, teachers and heads (one file per family; name registries that import a family when it is built).

The heavy parts (``heads``, ``teachers.base``) are imported from their modules; this package and its
registries import no torch, so a config's names are checked without it.
"""

from ega_ray.models.students import STUDENTS, build_student
from ega_ray.models.teachers import TEACHERS, build_teacher

__all__ = ["STUDENTS", "TEACHERS", "build_student", "build_teacher"]
