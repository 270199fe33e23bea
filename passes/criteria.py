"""The criteria registry with every built-in criterion registered.

The registry, the context and the data-free criteria live in criteria_core, the rest
in criteria_extra (which builds on criteria_core); importing this module loads both.
CRITERIA here is the registry itself (criteria_core.CRITERIA): patch it there.
"""

from surgery.passes import criteria_extra  # noqa: F401  (registers bn-scale, fpgm, lamp, data-aware ones)
from surgery.passes.criteria_core import (  # noqa: F401
    CRITERIA,
    Criterion,
    CriterionContext,
    as_criterion,
    criterion,
    get_criterion,
    l1,
    l2,
    needs_stats,
    per_index,
    random,
    taylor,
)
