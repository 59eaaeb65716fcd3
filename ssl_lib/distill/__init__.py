"""Distillation from frozen teachers: teacher specs and the teacher feature cache."""

from ssl_lib.distill.cache import TeacherCache, sample_keys, write_cache
from ssl_lib.distill.teacher import (
    Teacher,
    TeacherConfig,
    build_network,
    build_teacher,
    check_teachers,
    map_teacher_keys,
    teacher_fingerprint,
)

__all__ = [
    "Teacher",
    "TeacherCache",
    "TeacherConfig",
    "build_network",
    "build_teacher",
    "check_teachers",
    "map_teacher_keys",
    "sample_keys",
    "teacher_fingerprint",
    "write_cache",
]
