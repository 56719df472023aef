"""Adoption in one line: route torchvision's roi_pool and RoIPool through roi_ops.

``roi_ops.patch_torchvision()`` replaces `torchvision.ops.roi_pool` with `roi_ops.roi_pool` and
`torchvision.ops.RoIPool` with `roi_ops.RoIPool` wherever those objects are bound: in
``torchvision.ops``, in ``torchvision.ops.roi_pool`` (so RoIPool modules built before the patch
pool through roi_ops too: their forward calls that module's ``roi_pool``), and in every other
imported module that bound them by name (``from torchvision.ops import RoIPool`` in a detection
library's head). Modules imported later get roi_ops' objects from torchvision.ops. Code that
calls ``torch.ops.torchvision.roi_pool`` directly, or a model scripted before the patch, keeps
torchvision's kernel.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

from .functional import RoIPool, roi_pool

_lock = threading.Lock()
_active: TorchvisionPatch | None = None


class TorchvisionPatch:
    """What `patch_torchvision` replaced. `undo()` puts torchvision's objects back; used as a
    context manager, the patch lasts for the ``with`` block.

    A handle from a call made while a patch was already active owns nothing: its `undo` leaves
    the outer patch in place.
    """

    def __init__(self, replaced: list[tuple[dict, str, object, object]], owner: bool) -> None:
        self._replaced = replaced
        self._owner = owner

    @property
    def active(self) -> bool:
        """Whether this handle's patch is in place (false after `undo`, or for a nested handle)."""
        return self._owner and _active is self

    @property
    def bindings(self) -> list[str]:
        """The names replaced, as ``module.name`` (empty for a nested handle)."""
        return [f"{space.get('__name__', '?')}.{name}" for space, name, *_ in self._replaced]

    def undo(self) -> None:
        """Restore torchvision's roi_pool and RoIPool where this patch replaced them (a name
        someone rebound since is left alone). Safe to call twice."""
        global _active
        with _lock:
            if not self.active:
                return
            for namespace, name, original, replacement in self._replaced:
                if namespace.get(name) is replacement:
                    namespace[name] = original
            _active = None

    def __enter__(self) -> TorchvisionPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"<TorchvisionPatch {state}: {len(self._replaced)} bindings>"


def _torchvision_roi_pool_module() -> ModuleType:
    try:
        import torchvision.ops.roi_pool  # noqa: F401  (the submodule, not the function)
    except ImportError as error:
        raise ImportError(
            "roi_ops.patch_torchvision: torchvision is not installed; without it, call "
            f"roi_ops.roi_pool and roi_ops.RoIPool directly ({error})"
        ) from error
    return sys.modules["torchvision.ops.roi_pool"]


def _namespaces() -> list[dict]:
    namespaces = []
    for module in list(sys.modules.values()):
        try:
            namespace = vars(module)
        except TypeError:  # a stand-in object without a __dict__
            continue
        if isinstance(namespace, dict):
            namespaces.append(namespace)
    return namespaces


def patch_torchvision() -> TorchvisionPatch:
    """Make existing torchvision code pool through roi_ops, without edits.

    After this call `torchvision.ops.roi_pool` is `roi_ops.roi_pool` and
    `torchvision.ops.RoIPool` is `roi_ops.RoIPool`, in torchvision and in every imported module
    that bound them by name (see the module docstring). Backend choice then follows roi_ops'
    rules (``ROI_OPS_BACKEND``, `roi_ops.use_backend`). Results on finite inputs are identical;
    docs/torchvision.md lists what differs.

    Returns:
        A `TorchvisionPatch`: call ``.undo()`` (or `unpatch_torchvision`), or use it as a
        context manager, to restore torchvision's objects. Calling this again while a patch is
        active returns a handle that owns nothing (the patch stays until the first is undone).

    Raises:
        ImportError: torchvision is not installed.
    """
    global _active
    module = _torchvision_roi_pool_module()
    replacements = {id(module.roi_pool): roi_pool, id(module.RoIPool): RoIPool}
    originals = {id(module.roi_pool): module.roi_pool, id(module.RoIPool): module.RoIPool}
    with _lock:
        if _active is not None:
            return TorchvisionPatch([], owner=False)
        replaced = []
        for namespace in _namespaces():
            for name, value in list(namespace.items()):
                replacement = replacements.get(id(value))
                if replacement is not None and originals[id(value)] is value:
                    namespace[name] = replacement
                    replaced.append((namespace, name, value, replacement))
        _active = TorchvisionPatch(replaced, owner=True)
        return _active


def unpatch_torchvision() -> None:
    """Undo the active `patch_torchvision` (nothing to do when none is active)."""
    patch = _active
    if patch is not None:
        patch.undo()


def torchvision_patched() -> bool:
    """Whether a `patch_torchvision` is active."""
    return _active is not None
