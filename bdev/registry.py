"""`BdevRegistry`: the process's table of bdevs, its examine chain and its add/remove/resize listeners.

What it does: names bdevs (unique), runs the examine modules when a bdev registers and on
`reexamine()` (serialized per bdev), and tells listeners ("add", "remove", "resize") synchronously.
Removal always takes a bdev's dependents (partitions, anything whose `.base` is it) first, whether
it comes through `unregister()` or from the owner calling `bdev.hot_remove()` directly: the registry
holds a descriptor on every registered bdev and reacts to its "remove" event.

Order of events for a new disk (like udev): "add" for the disk, then "add" for each partition the
examine found; `register()` returns when both are done.

What it does not do: I/O (the examine modules do theirs through channels), or re-read partition
tables on a resize by itself (frontends or the owner call `reexamine`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import trio

from ._base import Bdev, BdevDesc, BdevError, BdevEvent

__all__ = ["BdevRegistry", "ExamineModule", "Listener"]

log = logging.getLogger(__name__)

Listener = Callable[[str, Bdev], None]


class ExamineModule(Protocol):
    name: str

    async def examine(self, registry: BdevRegistry, bdev: Bdev) -> None: ...


class BdevRegistry:
    def __init__(self, examine_modules: Iterable[ExamineModule] | None = None) -> None:
        if examine_modules is None:
            from .examine import PartitionExamine

            examine_modules = [PartitionExamine()]
        self._examine = list(examine_modules)
        self._bdevs: dict[str, Bdev] = {}
        self._descs: dict[str, BdevDesc] = {}
        self._listeners: list[Listener] = []
        self._examine_locks: dict[str, trio.Lock] = {}

    # -- lookup ------------------------------------------------------------------------------------

    def get(self, name: str) -> Bdev | None:
        return self._bdevs.get(name)

    def bdevs(self) -> list[Bdev]:
        """Registered bdevs in registration order."""
        return list(self._bdevs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._bdevs

    def __len__(self) -> int:
        return len(self._bdevs)

    # -- listeners ---------------------------------------------------------------------------------

    def add_listener(self, cb: Listener) -> None:
        """cb(event, bdev) with event "add" | "remove" | "resize"; called synchronously, must not block."""
        self._listeners.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        """Extension: stop calling `cb`."""
        try:
            self._listeners.remove(cb)
        except ValueError:
            pass

    def _notify(self, event: str, bdev: Bdev) -> None:
        for cb in list(self._listeners):
            try:
                cb(event, bdev)
            except Exception:  # a listener's bug must not stop the others or the registry
                log.exception("registry listener %r failed on %s %s", cb, event, bdev.name)

    # -- register / unregister ---------------------------------------------------------------------

    async def register(self, bdev: Bdev) -> None:
        """Add `bdev`, tell the listeners, then run the examine modules (which may register more)."""
        if bdev.name in self._bdevs:
            raise BdevError(errno.EEXIST, f"a bdev named {bdev.name} is already registered")
        if bdev.removed:
            raise BdevError(errno.ENODEV, f"{bdev.name} has been removed")
        base = bdev.base
        if base is not None and self._bdevs.get(base.name) is not base:
            raise BdevError(errno.ENODEV, f"{bdev.name}: its base {base.name} is not registered")
        self._descs[bdev.name] = bdev.open(self._on_event)
        self._bdevs[bdev.name] = bdev
        log.info("registered %s (%d blocks of %d bytes)", bdev.name, bdev.num_blocks, bdev.block_size)
        self._notify("add", bdev)
        await self._run_examine(bdev)

    async def unregister(self, name: str) -> None:
        """Hot-remove `name`: its dependents go first, then it; listeners hear each "remove"."""
        bdev = self._bdevs.get(name)
        if bdev is None:
            raise BdevError(errno.ENODEV, f"no bdev named {name}")
        for child in reversed(self._children(bdev)):
            await self.unregister(child.name)
        if bdev.removed:
            self._drop(bdev)  # removed behind our back without the event reaching us
        else:
            bdev.hot_remove()  # -> _on_event -> _drop
        await trio.lowlevel.checkpoint()

    async def reexamine(self, name: str) -> None:
        """Re-read the partition table of `name`: partitions are added, removed or resized to match."""
        bdev = self._bdevs.get(name)
        if bdev is None:
            raise BdevError(errno.ENODEV, f"no bdev named {name}")
        await self._run_examine(bdev)

    # -- internals ---------------------------------------------------------------------------------

    async def _run_examine(self, bdev: Bdev) -> None:
        lock = self._examine_locks.get(bdev.name)
        if lock is None:
            lock = self._examine_locks[bdev.name] = trio.Lock()
        async with lock:
            for module in self._examine:
                if bdev.removed or self._bdevs.get(bdev.name) is not bdev:
                    return
                await module.examine(self, bdev)

    def _children(self, bdev: Bdev) -> list[Bdev]:
        return [b for b in self._bdevs.values() if b.base is bdev]

    def _on_event(self, event: BdevEvent) -> None:
        bdev = event.bdev
        if self._bdevs.get(bdev.name) is not bdev:
            return
        if event.type == "resize":
            self._notify("resize", bdev)
        elif event.type == "remove":
            self._drop(bdev)

    def _drop(self, bdev: Bdev) -> None:
        if self._bdevs.get(bdev.name) is not bdev:
            return
        for child in reversed(self._children(bdev)):
            if child.removed:
                self._drop(child)
            else:
                child.hot_remove()  # -> _on_event -> _drop(child)
        del self._bdevs[bdev.name]
        desc = self._descs.pop(bdev.name, None)
        if desc is not None:
            desc.close()
        lock = self._examine_locks.get(bdev.name)
        if lock is not None and not lock.locked():
            del self._examine_locks[bdev.name]
        log.info("unregistered %s", bdev.name)
        self._notify("remove", bdev)

    def statistics(self) -> dict[str, Any]:
        return {b.name: b.statistics() for b in self._bdevs.values()}
