"""The TokenCheap emulator (see ``server`` for what it does and the faults it can inject)."""

from tcproxy.emulator.ratelimit import MODES, bucket_violations, max_in_window
from tcproxy.emulator.server import (
    EMULATOR,
    FAULT_HEADER,
    Emulator,
    EmulatorSettings,
    build_emulator,
)

__all__ = [
    "EMULATOR",
    "FAULT_HEADER",
    "MODES",
    "Emulator",
    "EmulatorSettings",
    "bucket_violations",
    "build_emulator",
    "max_in_window",
]
