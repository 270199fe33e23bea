"""Op specs, one module per op family (channel rule, rewrite, FLOP formula, consumer role);
importing this package registers them all."""

from . import attention, conv, elementwise, linear, norm, reduce, shape  # noqa: F401
from .base import FLOPS, REWRITES, RULES, RuleContext, Unsupported, flop_terms, flops, rewrite, rule  # noqa: F401
