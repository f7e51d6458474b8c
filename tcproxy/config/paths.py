"""Where tcproxy keeps files by default. Reads the environment, so it lives with the config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tcproxy.config.model import LedgerConfig

LEDGER_FILE = "usage.db"


def ledger_path(ledger: LedgerConfig, env: Mapping[str, str] | None = None) -> Path | None:
    """The usage ledger's file, or None when the ledger is off.

    ``ledger.path`` if set; under systemd ``$STATE_DIRECTORY/usage.db`` (``StateDirectory=``);
    otherwise ``$XDG_STATE_HOME/tcproxy/usage.db``, by default ``~/.local/state/tcproxy/usage.db``.
    """
    env = os.environ if env is None else env
    if not ledger.enabled:
        return None
    if ledger.path:
        return Path(ledger.path).expanduser()
    state_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        return Path(state_dir) / LEDGER_FILE
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tcproxy" / LEDGER_FILE
