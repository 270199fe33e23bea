"""Channel rules, one module per op family; importing this package registers them all."""

from . import attention, conv, elementwise, linear, norm, reduce, shape  # noqa: F401
from .base import FLOPS, RULES, RuleContext, Unsupported, flop_terms, flops, rule  # noqa: F401
