"""``DistillMethod``: the base of methods that learn from frozen teachers (SimReg, CompRess).

The teachers (:mod:`ssl_lib.distill`) are kept outside the module tree: the optimiser,
``state_dict`` (so checkpoints), DDP and ``train()`` never see them. They follow the student's
device (:meth:`DistillMethod._apply`), are built when first needed, and their fingerprints are
saved in checkpoints and checked when a run resumes. The widths of the teachers are filled
into ``method.teachers[i].dim`` when training starts (:meth:`DistillMethod.prepare_config`), so
a student checkpoint can be evaluated without its teacher's files.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import Tensor

from ssl_lib.checkpoints import CheckpointError
from ssl_lib.distill import Teacher, build_teacher, sample_keys
from ssl_lib.methods.base import SSLMethod
from ssl_lib.rng import CHECKPOINT_KEY
from ssl_lib.schema import ConfigError

FINGERPRINTS = "teacher_fingerprints"


class DistillMethod(SSLMethod):
    """An :class:`SSLMethod` with frozen teachers from ``method.teachers``."""

    def __init__(self, config: DictConfig | dict[str, Any]) -> None:
        super().__init__(config)
        self._teachers: list[Teacher] | None = None
        if any(spec.dim is None for spec in self.cfg.method.teachers):
            self.teachers()  # the widths come from the teachers themselves

    @classmethod
    def prepare_config(cls, cfg: DictConfig, datamodule: Any) -> None:
        """Build every teacher once (bad keys and files fail here, before a run folder
        exists), check a cache against the training set, and record each width in ``dim``."""
        keys = None
        for i, spec in enumerate(cfg.method.teachers):
            teacher = build_teacher(spec)
            where = f"method.teachers.{i}.cache"
            if teacher.cache is not None:
                if keys is None:
                    keys = sample_keys(datamodule.build_train_set().base, cfg.data.root)
                teacher.cache.check_dataset(keys, where)
            if spec.dim is not None and spec.dim != teacher.dim:
                raise ConfigError(
                    f"method.teachers.{i}.dim={spec.dim}, but the teacher gives {teacher.dim}-d "
                    "features (remove dim: it is filled in from the teacher)"
                )
            spec.dim = teacher.dim

    def teachers(self) -> list[Teacher]:
        """The frozen teachers, built on first use, on the student's device."""
        if self._teachers is None:
            built = [build_teacher(spec) for spec in self.cfg.method.teachers]
            self._teachers = [t.to(self.device) for t in built]
            for spec, teacher in zip(self.cfg.method.teachers, built, strict=True):
                if spec.dim is None:
                    spec.dim = teacher.dim
        return self._teachers

    @property
    def teacher_dims(self) -> list[int]:
        """The teachers' feature widths."""
        return [int(spec.dim) for spec in self.cfg.method.teachers]

    def teacher_features(self, images: Tensor, index: Tensor) -> list[Tensor]:
        """Each teacher's ``(B, dim_k)`` float32 features of ``images`` (dataset ``index``
        for a cache); no gradients."""
        return [teacher(images, index) for teacher in self.teachers()]

    def _apply(self, fn: Any, recurse: bool = True) -> DistillMethod:
        """Device and dtype moves of the student also move the teachers (not submodules)."""
        super()._apply(fn, recurse)
        for teacher in getattr(self, "_teachers", None) or []:
            teacher._apply(fn, recurse)
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The teachers' fingerprints instead of their weights."""
        super().on_save_checkpoint(checkpoint)
        prints = [t.fingerprint for t in self.teachers()]
        checkpoint.setdefault(CHECKPOINT_KEY, {})[FINGERPRINTS] = prints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume with teachers other than those the run was trained with."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY, {}).get(FINGERPRINTS)
        if saved is None:
            return
        for i, (old, teacher) in enumerate(zip(saved, self.teachers(), strict=True)):
            if old is not None and teacher.fingerprint is not None and old != teacher.fingerprint:
                raise CheckpointError(
                    f"method.teachers.{i}: the teacher's files changed since the checkpoint was "
                    f"written (fingerprint {teacher.fingerprint[:12]}..., was {old[:12]}...); "
                    "resume with the original teacher"
                )
