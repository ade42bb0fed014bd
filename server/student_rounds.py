"""Phase `student-rounds` (dp-opd): the student, built once, then federated DP-SGD rounds of its LoRA.

The student (``student``, the `distill` section's setting, as for distildp: from-teacher, a
tiny spec, or an HF id / local path such as a public-warmed student) is saved first as
RUN_DIR/student-base (``save_pretrained`` + tokenizer): the base every site loads and
adapts. It is built from public weights or from a DP teacher (post-processing of its
release): no privacy cost. Then the same round loop as the teacher's (FedAvg, held-out
validation, central DP and SecAgg+ where configured; ``server/teacher_rounds.py``) runs on
that base, and the sites' train route runs ``client/dp_opd.py``. The rounds' held-out
figures (and ``heldout_perplexity``) are the student's; the baseline is the untrained student's.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from common.models.build import count_parameters
from common.models.loading import build_student, load_teacher
from common.settings import STUDENT_BASE_DIR
from server import teacher_rounds


def student_base(phase) -> dict:
    """Build and save the student (a resumed run keeps the one its adapters were trained on)."""
    settings = phase.settings
    teacher_dir, teacher_adapter = settings.opd_teacher_model()
    teacher, tokenizer = load_teacher(teacher_dir, settings.dp, teacher_adapter)
    out = phase.run.path / STUDENT_BASE_DIR
    if settings.resume and (out / "config.json").is_file():
        student = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    else:
        student = build_student(settings.distill.student, teacher, tokenizer, seed=settings.seed)
        student.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return {"student": STUDENT_BASE_DIR, "teacher": settings.opd.opd_teacher,
            "student_parameters": count_parameters(student)[1], "teacher_parameters": count_parameters(teacher)[1]}


def run(phase) -> dict:
    built = student_base(phase)
    return {**built, **teacher_rounds.run(phase)}
