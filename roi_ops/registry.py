"""Backend registry: lazy discovery through the ``roi_ops.backends`` entry-point group.

Nothing is imported until a backend is first needed. A plugin that fails to load, or whose
availability check raises, is kept as an unavailable entry whose reason is the error; it warns
once and affects no other backend. Two plugins may not share a name silently.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata

from .backend import Backend

ENTRY_POINT_GROUP = "roi_ops.backends"
CORE_DISTRIBUTION = "roi-ops"


@dataclass
class BackendEntry:
    """One registered backend, loaded lazily."""

    name: str
    origin: str  # "entry point" or "register_backend"
    distribution: str | None = None
    version: str | None = None
    target: str | None = None  # "module:Class" for entry points
    entry_point: metadata.EntryPoint | None = None
    backend: Backend | None = None
    problem: str | None = None  # load error or name clash: the entry can never run
    _availability: str | None = field(default=None, repr=False)
    _availability_known: bool = field(default=False, repr=False)


@dataclass(frozen=True)
class BackendInfo:
    """What `list_backends` reports about one backend."""

    name: str
    origin: str
    distribution: str | None
    version: str | None
    device_types: tuple[str, ...]
    dtypes: tuple[str, ...]
    priority: int
    deterministic: bool | None
    deterministic_backward: bool | None
    reports_bad_rois: bool | None
    available: bool
    reasons: tuple[str, ...]
    description: str


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-")


class Registry:
    """Thread-safe name -> `BackendEntry` map, discovered from entry points on first use."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self._group = group
        self._lock = threading.RLock()
        self._entries: dict[str, BackendEntry] = {}
        self._discovered = False
        self._warned: set[str] = set()
        self._sorted: list[BackendEntry] | None = None
        # Bumped whenever the set of entries changes: dispatch caches its choices per version.
        self.version = 0

    def _changed(self) -> None:
        self._sorted = None
        self.version += 1

    # Discovery -------------------------------------------------------------------------------

    def _discover(self) -> None:
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            found: dict[str, list[BackendEntry]] = {}
            seen = set()
            for ep in metadata.entry_points(group=self._group):
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else None
                key = (ep.name, ep.value, dist_name)
                if key in seen:  # the same distribution visible twice on sys.path
                    continue
                seen.add(key)
                entry = BackendEntry(
                    name=ep.name,
                    origin="entry point",
                    distribution=dist_name,
                    version=dist.version if dist is not None else None,
                    target=ep.value,
                    entry_point=ep,
                )
                found.setdefault(ep.name, []).append(entry)
            for name, entries in found.items():
                self._add_discovered(name, entries)
            self._discovered = True
            self._changed()

    def _add_discovered(self, name: str, entries: list[BackendEntry]) -> None:
        existing = self._entries.get(name)
        if existing is not None:  # registered in-process before discovery ran
            entries = [existing, *entries]
        if len(entries) == 1:
            self._entries[name] = entries[0]
            return
        core = [e for e in entries if _normalize(e.distribution or "") == CORE_DISTRIBUTION]
        providers = ", ".join(f"{e.distribution or e.origin} ({e.target})" for e in entries)
        if core:
            self._entries[name] = core[0]
            message = (
                f"backend name {name!r} is claimed by several plugins: {providers}; the core's wins"
            )
        else:
            message = (
                f"backend name {name!r} is claimed by several plugins: {providers}; uninstall "
                "all but one"
            )
            self._entries[name] = BackendEntry(name=name, origin="entry point", problem=message)
        self._warn_once(f"clash:{name}", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"roi_ops: {message}", RuntimeWarning, stacklevel=4)

    # Loading ---------------------------------------------------------------------------------

    def _load(self, entry: BackendEntry) -> None:
        if entry.backend is not None or entry.problem is not None:
            return
        with self._lock:
            if entry.backend is not None or entry.problem is not None:
                return
            try:
                loaded = entry.entry_point.load()
                backend = loaded() if isinstance(loaded, type) else loaded
                if not isinstance(backend, Backend):
                    raise TypeError(
                        f"expected a roi_ops.Backend subclass or instance, got {loaded!r}"
                    )
                if backend.name != entry.name:
                    raise ValueError(
                        f"entry point name {entry.name!r} differs from the backend's name "
                        f"{backend.name!r}"
                    )
                entry.backend = backend
            except Exception as error:  # isolate any plugin failure
                entry.problem = f"failed to load {entry.target!r}: {type(error).__name__}: {error}"
                self._warn_once(f"load:{entry.name}", f"backend {entry.name!r} {entry.problem}")

    def availability(self, entry: BackendEntry) -> str | None:
        """Why `entry` cannot run at all in this process (cached), or None."""
        self._load(entry)
        if entry.problem is not None:
            return entry.problem
        if not entry._availability_known:
            try:
                reason = entry.backend.check_available()
            except Exception as error:
                reason = f"check_available raised {type(error).__name__}: {error}"
                self._warn_once(f"avail:{entry.name}", f"backend {entry.name!r}: {reason}")
            entry._availability = reason
            entry._availability_known = True
        return entry._availability

    # Public operations -----------------------------------------------------------------------

    def entries(self) -> list[BackendEntry]:
        """All entries, highest priority first (then by name); loads every plugin."""
        self._discover()
        cached = self._sorted
        if cached is not None:
            return list(cached)
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            self._load(entry)
        ordered = sorted(
            entries, key=lambda e: (-(e.backend.priority if e.backend else -1e9), e.name)
        )
        with self._lock:
            if all(self._entries.get(e.name) is e for e in ordered):
                self._sorted = ordered
        return list(ordered)

    def get(self, name: str) -> BackendEntry | None:
        """The entry called `name` (any case), or None."""
        self._discover()
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                folded = name.casefold()
                entry = next((e for n, e in self._entries.items() if n.casefold() == folded), None)
            return entry

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._discover()
        with self._lock:
            return sorted(self._entries)

    def register(self, backend: Backend | type[Backend], *, replace: bool = False) -> Backend:
        """Register `backend` in this process. Raises ValueError on a name clash."""
        instance = backend() if isinstance(backend, type) else backend
        if not isinstance(instance, Backend):
            raise TypeError(
                f"backend: expected a roi_ops.Backend subclass or instance, got {backend!r}"
            )
        if not instance.name or "," in instance.name or instance.name == "auto":
            raise ValueError(
                f"backend: expected a name without commas other than 'auto', got {instance.name!r}"
            )
        self._discover()
        with self._lock:
            existing = self._entries.get(instance.name)
            if existing is not None and not replace:
                source = existing.distribution or existing.origin
                raise ValueError(
                    f"backend: the name {instance.name!r} is already registered (by {source}); "
                    "pass replace=True to replace it"
                )
            self._entries[instance.name] = BackendEntry(
                name=instance.name,
                origin="register_backend",
                distribution=None,
                version=None,
                target=f"{type(instance).__module__}:{type(instance).__qualname__}",
                backend=instance,
            )
            self._changed()
        return instance

    def unregister(self, name: str) -> None:
        """Remove the backend called `name`. Raises KeyError if there is none."""
        self._discover()
        with self._lock:
            if name not in self._entries:
                raise KeyError(f"name: no backend called {name!r}; known: {sorted(self._entries)}")
            del self._entries[name]
            self._changed()

    def reset(self) -> None:
        """Forget everything, so the next use discovers entry points again (for tests)."""
        with self._lock:
            self._entries.clear()
            self._discovered = False
            self._warned.clear()
            self._changed()

    def info(self, entry: BackendEntry) -> BackendInfo:
        """`BackendInfo` for `entry`."""
        reason = self.availability(entry)
        backend = entry.backend
        dtype_names = ()
        if backend is not None:
            dtype_names = tuple(sorted(str(d).removeprefix("torch.") for d in backend.dtypes))
        return BackendInfo(
            name=entry.name,
            origin=entry.origin,
            distribution=entry.distribution,
            version=entry.version,
            device_types=tuple(sorted(backend.device_types)) if backend else (),
            dtypes=dtype_names,
            priority=backend.priority if backend else 0,
            deterministic=backend.deterministic if backend else None,
            deterministic_backward=backend.deterministic_backward if backend else None,
            reports_bad_rois=backend.reports_bad_rois if backend else None,
            available=reason is None,
            reasons=(reason,) if reason else (),
            description=backend.description if backend else "",
        )


REGISTRY = Registry()


def register_backend(backend: Backend | type[Backend], *, replace: bool = False) -> Backend:
    """Register a backend in this process (tests, notebooks) and return its instance.

    Args:
        backend: a `Backend` subclass (instantiated with no arguments) or instance.
        replace: allow replacing a backend of the same name.

    Raises:
        ValueError: the name is taken and `replace` is False, or the name is invalid.
        TypeError: `backend` is not a `Backend`.
    """
    return REGISTRY.register(backend, replace=replace)


def unregister_backend(name: str) -> None:
    """Remove a backend registered under `name` (in this process only)."""
    REGISTRY.unregister(name)


def list_backends() -> list[BackendInfo]:
    """Every known backend with its origin, capabilities and availability, best first."""
    return [REGISTRY.info(entry) for entry in REGISTRY.entries()]
