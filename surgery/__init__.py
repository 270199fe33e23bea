"""surgery: a graph-based model surgery compiler. Prune any ONNX model, exactly."""

from surgery.errors import SurgeryError

__all__ = ["SurgeryError", "analyze", "apply", "criterion", "load", "prune", "prune_module", "save"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import surgery` stays cheap and torch-free
    if name in ("analyze", "apply", "load", "prune", "save"):
        from surgery import api

        return getattr(api, name)
    if name == "prune_module":  # needs torch, imported only when asked for
        try:
            from surgery.torch_api import prune_module
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            raise SurgeryError("pruning a PyTorch module needs PyTorch: pip install 'surgery[torch]'") from e
        return prune_module
    if name == "criterion":
        from surgery.passes.criteria import criterion

        return criterion
    raise AttributeError(name)
