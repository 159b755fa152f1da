"""The small test-harness ports test kernels use to talk to their emulator. Pure Python;
the machine's port handlers use them (cpu/machine.py `_on_port_out`).

* 0xF4 `isa-debug-exit` (QEMU): writing v ends the run, exit code v (QEMU itself exits
  with status (v << 1) | 1). Handled by the machine (`EXIT_PORT`).
* 0x8900 Bochs' shutdown port: the bytes "Shutdown" written one by one, in order, end the
  run. Each byte that continues the string advances it; an "S" starts it over; any other
  byte resets it (so "ShutShutdown" still ends the run and "Shutdownx" ends it at the "n").
* 0xE4 pc-testdev "flush page" (QEMU `-device pc-testdev`, used by kvm-unit-tests): a
  32-bit write of an address makes the hypervisor drop that page's mapping, so the next
  guest access to it exits to the hypervisor, in the middle of whatever the CPU is doing
  (an event delivery, say). In idtlab the address is taken as a guest-linear one (under
  the identity maps such kernels use, linear = physical) and the engine's translation is
  dropped: the next access goes through the TLB-fill hook and guest paging again. Unicorn
  can only drop every translation at once, which architecturally is always allowed
  (a TLB may forget any entry); the trace records the address the guest named.
"""

from __future__ import annotations

FLUSH_PAGE_PORT = 0xE4
BOCHS_SHUTDOWN_PORT = 0x8900
SHUTDOWN_STRING = b"Shutdown"


class BochsShutdown:
    """Bochs' shutdown port: `write(byte)` returns True when it completes "Shutdown"."""

    def __init__(self) -> None:
        self.matched = 0  # bytes of SHUTDOWN_STRING seen in order so far

    def write(self, value: int) -> bool:
        byte = value & 0xFF
        if byte == SHUTDOWN_STRING[self.matched]:
            self.matched += 1
        elif byte == SHUTDOWN_STRING[0]:
            self.matched = 1
        else:
            self.matched = 0
        if self.matched == len(SHUTDOWN_STRING):
            self.matched = 0
            return True
        return False

    def completes(self, value: int) -> bool:
        """Would writing `value` now complete the string (without writing it)?"""
        return self.matched == len(SHUTDOWN_STRING) - 1 and value & 0xFF == SHUTDOWN_STRING[-1]
