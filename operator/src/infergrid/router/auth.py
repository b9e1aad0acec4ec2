"""API keys from a file (one per line, `#` comments), compared in constant time, re-read when the
file's mtime or size changes (a rotated Secret mount swaps the file). Keys are never logged."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class KeyFile:
    """`check(authorization_header)` -> bool. An unreadable or empty file admits nobody."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: tuple[bytes, ...] = ()
        self._reload()

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp is not None or not self._keys:
                log.error("API key file %s unreadable (%s): refusing every request", self.path, exc.strerror)
            self._stamp, self._keys = None, ()
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        self._keys = tuple(k.encode() for line in lines if (k := line.strip()) and not k.startswith("#"))
        self._stamp = stamp
        log.info("API key file %s loaded: %d key(s)", self.path, len(self._keys))

    def check(self, authorization: str | None) -> bool:
        self._reload()
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization[7:].strip().encode()
        ok = False
        for key in self._keys:  # every key is compared: the time does not say which one matched
            ok |= hmac.compare_digest(given, key)
        return ok
