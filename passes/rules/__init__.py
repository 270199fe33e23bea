"""Op specs, one module per op family (channel rule, rewrite, FLOP formula, consumer role,
normalization scale), each registered by decorator in base.py's registries. Importing this
package imports every module in it, so a new family is one new file here."""

import importlib
import pkgutil

from .base import (  # noqa: F401
    CONSUMERS, FLOPS, NORM_SCALE, REWRITES, RULES, RuleContext, Unsupported, consumer, flop_terms, flops, norm_scale,
    op_key, rewrite, rule,
)

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")
