"""Which machine around the CPU: QEMU's default `pc` (what every test kernel gets unless
it asks), or `q35` with optional devices (`idtlab run --machine q35 --device
intel-iommu --device edu`, QEMU's `-M q35 -device intel-iommu,intremap=on,eim=off
-device edu`).

    pc     the devices cpu/platform.py lists, no PCI: port 0xCF8-0xCFF reads all ones, as
           on every machine idtlab modelled before (tests probing for PCI devices find
           none)
    q35    adds PCI configuration mechanism #1 with bus 0 and q35's host bridge at 00:00.0
           (cpu/devices/pci.py); the devices below need it

Devices (q35 only; each at most once):

    intel-iommu   the VT-d remapping unit at 0xFED90000 (cpu/devices/vtd.py), QEMU's
                  `intel-iommu,intremap=on,eim=off`; those two QEMU options may be
                  spelled out, others are refused
    edu           QEMU's educational device at 00:02.0 (cpu/devices/edu.py)

`parse` checks a request and names what is wrong in one line (`ValueError`), for the
command line to report as bad input.
"""

from __future__ import annotations

from dataclasses import dataclass

MACHINES = ("pc", "q35")
DEVICES = ("intel-iommu", "edu")
# The intel-iommu options idtlab's unit is: QEMU's defaults are intremap=off, eim=auto.
IOMMU_OPTIONS = frozenset({"intremap=on", "eim=off"})


@dataclass(frozen=True)
class BoardConfig:
    """A machine type and its optional devices."""

    machine: str = "pc"
    devices: tuple[str, ...] = ()

    @property
    def pci(self) -> bool:
        return self.machine == "q35"

    @property
    def iommu(self) -> bool:
        return "intel-iommu" in self.devices

    @property
    def edu(self) -> bool:
        return "edu" in self.devices


PC = BoardConfig()


def parse(machine: str, devices: list[str] | tuple[str, ...]) -> BoardConfig:
    """A board from the command line's `--machine` and `--device` values."""
    if machine not in MACHINES:
        raise ValueError(f"--machine {machine}: unknown machine type (known: {', '.join(MACHINES)})")
    names: list[str] = []
    for spec in devices:
        name, *options = spec.split(",")
        if name not in DEVICES:
            raise ValueError(f"--device {spec}: unknown device (known: {', '.join(DEVICES)})")
        if name in names:
            raise ValueError(f"--device {name} given twice (one of each is modelled)")
        if name == "intel-iommu":
            other = [o for o in options if o not in IOMMU_OPTIONS]
            if other:
                raise ValueError(f"--device {spec}: idtlab models intel-iommu with "
                                 f"intremap=on,eim=off only (not {','.join(other)})")
        elif options:
            raise ValueError(f"--device {spec}: edu takes no options here")
        if machine != "q35":
            raise ValueError(f"--device {name} needs --machine q35 (the pc machine is modelled "
                             "without PCI)")
        names.append(name)
    return BoardConfig(machine, tuple(d for d in DEVICES if d in names))
