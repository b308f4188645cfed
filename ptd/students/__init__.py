"""Students from pruned teachers: the width rule, coupled groups, rebuild or channel surgery.

``derive_student(teacher, masks, inherit=False) -> (student, StudentPlan)`` is the entry point;
see :mod:`ptd.students.derive` for what it does and :mod:`ptd.students.width_rule` for the rule.
"""
from ptd.students.derive import derive_configured, derive_student
from ptd.students.graph import DerivationError
from ptd.students.plan import LayerRow, StudentPlan
from ptd.students.report import compare, format_report
from ptd.students.surgery import apply_widths
from ptd.students.width_rule import conv_width, group_width, vgg_widths

# ptd.models replays a derived student's channel surgery through this registration (models may
# not import students: it is the layer below).
from ptd.models import SPEC_STEPS as _SPEC_STEPS  # noqa: E402

if "channel_widths" not in _SPEC_STEPS:
    _SPEC_STEPS.add("channel_widths", lambda model, spec: apply_widths(model, spec["channel_widths"], int(spec["trace_size"])))

__all__ = [
    "DerivationError",
    "LayerRow",
    "StudentPlan",
    "apply_widths",
    "compare",
    "format_report",
    "conv_width",
    "derive_configured",
    "derive_student",
    "group_width",
    "vgg_widths",
]
