"""QEMU's firmware configuration device (fw_cfg), legacy I/O-port interface, read-only:
what test kernels ask it (kvm-unit-tests' lib/x86/fwcfg.c reads the CPU count and the
RAM size this way). Pure Python; the machine's port handlers call it.

Interface (QEMU docs/specs/fw_cfg.rst, "Selector Register" / "Data Register"): a 16-bit
write of a key to the selector port 0x510 selects an item and resets the data offset; each
byte read of the data port 0x511 returns the item's next byte, and 0 past its end or for
a key with no item. Bit 14 of the selector (write channel) and bit 15 (architecture-local
items) are part of the key; no item here has either.

Items, encoded as QEMU encodes them (integers little-endian):

    0x0000  FW_CFG_SIGNATURE  "QEMU" (4 bytes)
    0x0001  FW_CFG_ID         u32: 1 = the traditional interface, no DMA
    0x0003  FW_CFG_RAM_SIZE   u64: guest RAM in bytes
    0x0005  FW_CFG_NB_CPUS    u16: CPUs present (1)
    0x000F  FW_CFG_MAX_CPUS   u16: 1
    0x0019  FW_CFG_FILE_DIR   u32 big-endian file count: 0 (no files)

Other access forms (a byte write to the selector, a wider data read, data writes, the DMA
ports 0x514..0x51B) are not handled here: the machine treats them as unknown port
accesses (reads all ones, writes ignored, both in the trace).
"""

from __future__ import annotations

import struct

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511

FW_CFG_SIGNATURE = 0x0000
FW_CFG_ID = 0x0001
FW_CFG_RAM_SIZE = 0x0003
FW_CFG_NB_CPUS = 0x0005
FW_CFG_MAX_CPUS = 0x000F
FW_CFG_FILE_DIR = 0x0019
FW_CFG_ID_TRADITIONAL = 1

ITEM_NAMES = {FW_CFG_SIGNATURE: "signature", FW_CFG_ID: "id", FW_CFG_RAM_SIZE: "ram_size",
              FW_CFG_NB_CPUS: "nb_cpus", FW_CFG_MAX_CPUS: "max_cpus", FW_CFG_FILE_DIR: "file_dir"}


class FwCfg:
    """The items of one machine: `ram_size` bytes of RAM, `cpus` CPUs."""

    def __init__(self, *, ram_size: int, cpus: int = 1) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_ID_TRADITIONAL),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),
        }
        self.key = FW_CFG_SIGNATURE
        self.offset = 0

    def select(self, key: int) -> None:
        self.key = key & 0xFFFF
        self.offset = 0

    def read_data(self) -> int:
        item = self.items.get(self.key, b"")
        byte = item[self.offset] if self.offset < len(item) else 0
        self.offset += 1
        return byte
