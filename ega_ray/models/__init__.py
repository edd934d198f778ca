"""Students, teachers and heads (one file per family, timm-style registries)."""

from ega_ray.models.heads import EmbeddingHead, StudentClassifier
from ega_ray.models.students import STUDENTS, build_student
from ega_ray.models.teachers import TEACHERS, Teacher, build_teacher

__all__ = ["STUDENTS", "TEACHERS", "EmbeddingHead", "StudentClassifier", "Teacher", "build_student", "build_teacher"]
