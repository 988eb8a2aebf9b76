"""An object store that can stop answering, in memory: an async fsspec filesystem (as s3fs, gcsfs
and adlfs are, so that svp's deadlines apply to it) under the protocol ``stalling://``.

A request whose method and path match a stall (:meth:`StallingStore.stall`) waits for an hour, as a
black-holed store does; every other one is answered at once. Registered in this process only.
"""

from __future__ import annotations

import asyncio
import re

import fsspec
from fsspec.asyn import AsyncFileSystem

PROTOCOL = "stalling"


class StallingStore(AsyncFileSystem):
    protocol = PROTOCOL
    root_marker = ""
    cachable = False  # the state is the class's: reset by reset()
    files: dict[str, bytes] = {}
    stalls: list[tuple[str, re.Pattern]] = []
    stalled: list[str] = []  # "METHOD path" of every request held

    @classmethod
    def reset(cls) -> None:
        cls.files.clear()
        cls.stalls.clear()
        cls.stalled.clear()

    @classmethod
    def stall(cls, method: str, pattern: str) -> None:
        """Hold every ``method`` ("GET", "PUT") request whose path matches ``pattern`` (a regex)."""
        cls.stalls.append((method, re.compile(pattern)))

    async def _hold_if_stalled(self, method: str, path: str) -> None:
        if any(method == wanted and pattern.search(path) for wanted, pattern in self.stalls):
            self.stalled.append(f"{method} {path}")
            await asyncio.sleep(3600)

    async def _info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path in self.files:
            return {"name": path, "size": len(self.files[path]), "type": "file"}
        if any(name.startswith(f"{path}/") for name in self.files):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    async def _ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        entries = {}
        for name, data in self.files.items():
            if name.startswith(f"{path}/"):
                child, *below = name[len(path) + 1:].split("/", 1)
                entries[f"{path}/{child}"] = {"name": f"{path}/{child}", "size": 0 if below else len(data),
                                              "type": "directory" if below else "file"}
        if not entries:
            raise FileNotFoundError(path)
        return list(entries.values()) if detail else sorted(entries)

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        await self._hold_if_stalled("GET", path)
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path][start:end]

    async def _put_file(self, lpath, rpath, **kwargs):
        rpath = self._strip_protocol(rpath)
        await self._hold_if_stalled("PUT", rpath)
        with open(lpath, "rb") as stream:
            self.files[rpath] = stream.read()


fsspec.register_implementation(PROTOCOL, StallingStore, clobber=True)
