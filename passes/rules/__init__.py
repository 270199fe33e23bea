"""Op specs, one module per op family (channel rule, rewrite, FLOP formula, consumer role);
importing this package registers them all."""

from . import attention, conv, elementwise, linear, norm, reduce, shape  # noqa: F401
from .base import (  # noqa: F401
    CONSUMERS, FLOPS, NORM_SCALE, REWRITES, RULES, RuleContext, Unsupported, consumer, flop_terms, flops, norm_scale,
    op_key, rewrite, rule,
)
