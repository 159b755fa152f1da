"""The PC's pair of 8259A programmable interrupt controllers (PICs): ISA IRQ 0-7 on the
master, IRQ 8-15 on the slave, whose output is the master's input 2 (the cascade).

Sources: the Intel 8259A datasheet (order number 231468: "Initialization Command Words",
"Operation Command Words", "The Cascade Buffer/Comparator", "Interrupt Sequence") and
QEMU hw/intc/i8259.c, whose function names are used below. A standalone model: pure,
deterministic, no engine.

Registers (per chip; master at I/O 0x20-0x21, slave at 0xA0-0xA1)
----------------------------------------------------------------
* IRR, the interrupt request register: one bit per input that is requesting. An
  edge-triggered input (the PC default) sets its bit on a rising edge and the bit stays
  set when the line drops again (`last_irr` remembers the line's level so that only an
  edge counts); INTA clears it. A level-triggered input (ICW1.LTIM, or the chipset's
  ELCR at 0x4D0/0x4D1) has its IRR bit follow the line, and INTA does not clear it.
* ISR, the in-service register: INTA sets the bit of the request it acknowledges; an
  EOI clears it (non-specific: the highest-priority in-service bit; specific: a named
  one). In automatic-EOI mode (ICW4.AEOI) INTA sets nothing.
* IMR, the interrupt mask register (OCW1, a write to the odd port): a masked input can
  still set its IRR bit, it is just not raised.
* Priority: fully nested, IR0 highest, unless rotated (`priority_add`: OCW2's rotate
  commands make the input after the one serviced the highest). A request is raised on
  the chip's INT output only when its priority is above every in-service bit's
  (`pic_get_irq`); in special mask mode (OCW3 SMM) masked in-service bits do not count,
  and in special fully nested mode (ICW4.SFNM) the master does not count its cascade
  input's in-service bit, so a higher-priority slave request gets through.
* The cascade: the slave's INT output drives the master's IR2. When the master's
  highest request is IR2, INTA is passed to the slave, which gives the vector (and sets
  its own ISR bit); otherwise the master gives it. The vector is the chip's ICW2 base
  (bits 7:3) plus the input number.
* Spurious interrupts: an INTA with no request left (the request was removed between
  INT and INTA) gets IR7's vector without setting ISR bit 7 on that chip; for the slave,
  the master still acknowledges IR2 (sets its ISR bit 2), as in QEMU's `pic_read_irq`.
* Reads (even port): IRR or ISR as OCW3 selected (RR/RIS), or, after an OCW3 poll
  command, the poll byte (0x80 | the highest request, acknowledged as by INTA; 0 when
  none). The odd port reads the IMR.

Initialisation: a write to the even port with bit 4 set is ICW1; it resets the chip
(IMR, ISR, IRR of edge inputs, priority, special mask cleared; `pic_init_reset`) and
the next writes to the odd port are ICW2 (vector base), ICW3 (only in cascade mode:
the master's slave bitmap or the slave's ID; the PC's wiring is fixed, so the value is
taken and ignored, as QEMU does), ICW4 (only when ICW1.IC4: AEOI, SFNM; 8086 mode is
assumed). OCW2 (bits 4:3 = 00): EOI, specific EOI, rotate and set-priority commands;
OCW3 (bits 4:3 = 01): register select, poll, special mask mode.

Reset state (docs/sdm-map.md, "The 8259A pair after firmware"): a PC firmware
initialises both chips before it starts an OS (vector bases 0x08 and 0x70, cascade on
IR2, 8086 mode, edge-triggered, normal EOI), and that is the state `Pic8259Pair` starts
in, produced by writing the same ICW sequence. The masks are all clear: idtlab has none
of the firmware's own devices (PIT, keyboard, RTC) that would raise a line unbidden, so
an input is only ever raised by the guest driving a pc-testdev line, which it means to
arrive (kvm-unit-tests' realmode "sti inhibit" raises IRQ 11 and waits in HLT for it).

Not modelled, raising `PicUnsupported`: single mode and the MCS-80/85 call mode (ICW1
SNGL or ICW4 uPM clear on the PC's cascaded pair), buffered mode is accepted and
ignored (it only changes pin functions).

All mutable state is in `PicState` (one per chip) and `PicPairState` (checkpoints copy
it whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

from cpu.errors import Unsupported

MASTER_PORT = 0x20   # 0x20-0x21
SLAVE_PORT = 0xA0    # 0xA0-0xA1
ELCR_PORT = 0x4D0    # 0x4D0 (IRQ 0-7), 0x4D1 (IRQ 8-15)
CASCADE_IRQ = 2
MASTER_BASE = 0x08   # what a PC BIOS programs (INT 08h-0Fh)
SLAVE_BASE = 0x70    # INT 70h-77h
# The PIIX ELCR: IRQ 0, 1, 2 (master) and 8, 13 (slave) cannot be level-triggered
# (QEMU hw/intc/i8259.c `elcr_mask`).
ELCR_MASKS = (0xF8, 0xDE)

ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW1 = 0x10
OCW3_SELECT = 0x08
ICW4_8086 = 0x01
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10


class PicUnsupported(Unsupported):
    """An 8259A mode idtlab does not model; the message names it."""


@dataclass
class PicState:
    """One 8259A."""

    irr: int = 0
    imr: int = 0
    isr: int = 0
    last_irr: int = 0          # the input lines' levels (edge detection)
    priority_add: int = 0      # rotation: the input with priority 0 is `priority_add`
    irq_base: int = 0          # ICW2 & 0xF8
    read_isr: bool = False     # OCW3 RR/RIS: the even port reads ISR (else IRR)
    poll: bool = False         # OCW3 P: the next even-port read is the poll byte
    special_mask: bool = False
    init_state: int = 0        # 0: ready; 1, 2, 3: ICW2, ICW3, ICW4 expected next
    init4: bool = False        # ICW1.IC4: an ICW4 follows
    single: bool = False       # ICW1.SNGL
    ltim: bool = False         # ICW1.LTIM: every input level-triggered
    auto_eoi: bool = False
    rotate_on_auto_eoi: bool = False
    special_fully_nested: bool = False
    elcr: int = 0              # level-triggered inputs (the chipset's ELCR)


def _priority(st: PicState, mask: int) -> int:
    """`get_priority`: the priority (0 highest) of the highest bit in `mask`, 8 if none."""
    if not mask & 0xFF:
        return 8
    p = 0
    while not mask & (1 << ((p + st.priority_add) & 7)):
        p += 1
    return p


def _level(st: PicState, irq: int) -> bool:
    return st.ltim or bool(st.elcr & (1 << irq))


def pending_irq(st: PicState, *, master: bool) -> int | None:
    """`pic_get_irq`: the input this chip raises INT for (its highest unmasked request,
    if it has priority over everything in service), or None."""
    p = _priority(st, st.irr & ~st.imr)
    if p == 8:
        return None
    in_service = st.isr
    if st.special_mask:
        in_service &= ~st.imr
    if st.special_fully_nested and master:
        in_service &= ~(1 << CASCADE_IRQ)
    if p < _priority(st, in_service):
        return (p + st.priority_add) & 7
    return None


def set_input(st: PicState, irq: int, level: bool) -> None:
    """`pic_set_irq`: input `irq` (0-7) of one chip goes to `level`."""
    bit = 1 << irq
    if _level(st, irq):
        st.irr = st.irr | bit if level else st.irr & ~bit
    elif level and not st.last_irr & bit:
        st.irr |= bit  # a rising edge: latched until INTA
    st.last_irr = st.last_irr | bit if level else st.last_irr & ~bit


def intack(st: PicState, irq: int) -> None:
    """`pic_intack`: INTA for input `irq` of one chip."""
    bit = 1 << irq
    if st.auto_eoi:
        if st.rotate_on_auto_eoi:
            st.priority_add = (irq + 1) & 7
    else:
        st.isr |= bit
    if not _level(st, irq):
        st.irr &= ~bit  # a level-triggered request stays until the line drops


def _init_reset(st: PicState) -> None:
    """`pic_init_reset`: what ICW1 clears (the ELCR is the chipset's and stays)."""
    for f in fields(PicState):
        if f.name not in ("elcr", "irr"):
            setattr(st, f.name, f.default)
    st.irr &= st.elcr


def write_command(st: PicState, value: int) -> None:
    """A write to the even port: ICW1, OCW2 or OCW3."""
    value &= 0xFF
    if value & ICW1:
        _init_reset(st)
        st.init_state = 1
        st.init4 = bool(value & ICW1_IC4)
        st.single = bool(value & ICW1_SNGL)
        st.ltim = bool(value & ICW1_LTIM)
        if st.single:
            raise PicUnsupported("8259A: ICW1 single mode (SNGL = 1) on the PC's cascaded pair "
                                 "is not modelled")
        return
    if value & OCW3_SELECT:
        if value & 0x04:
            st.poll = True
        if value & 0x02:
            st.read_isr = bool(value & 0x01)
        if value & 0x40:
            st.special_mask = bool(value & 0x20)
        return
    cmd = value >> 5
    if cmd in (0, 4):              # rotate in automatic EOI mode: clear / set
        st.rotate_on_auto_eoi = cmd == 4
    elif cmd in (1, 5):            # non-specific EOI (5: and rotate)
        p = _priority(st, st.isr)
        if p != 8:
            irq = (p + st.priority_add) & 7
            st.isr &= ~(1 << irq)
            if cmd == 5:
                st.priority_add = (irq + 1) & 7
    elif cmd == 3:                 # specific EOI
        st.isr &= ~(1 << (value & 7))
    elif cmd == 6:                 # set priority: IR(value) lowest
        st.priority_add = ((value & 7) + 1) & 7
    elif cmd == 7:                 # rotate on specific EOI
        irq = value & 7
        st.isr &= ~(1 << irq)
        st.priority_add = (irq + 1) & 7
    # cmd 2: no operation


def write_data(st: PicState, value: int) -> None:
    """A write to the odd port: OCW1 (the IMR), or the next ICW."""
    value &= 0xFF
    if st.init_state == 0:
        st.imr = value
    elif st.init_state == 1:
        st.irq_base = value & 0xF8
        st.init_state = 2  # cascade mode (single mode is refused): ICW3 next
    elif st.init_state == 2:
        st.init_state = 3 if st.init4 else 0
    else:
        if not value & ICW4_8086:
            raise PicUnsupported("8259A: ICW4 with uPM = 0 (MCS-80/85 mode) is not modelled")
        st.special_fully_nested = bool(value & ICW4_SFNM)
        st.auto_eoi = bool(value & ICW4_AEOI)
        st.init_state = 0


def read_command(st: PicState, *, master: bool) -> int:
    """A read of the even port: the poll byte after OCW3 P, else IRR or ISR."""
    if st.poll:
        st.poll = False
        irq = pending_irq(st, master=master)
        if irq is None:
            return 0
        intack(st, irq)
        return 0x80 | irq
    return st.isr if st.read_isr else st.irr


@dataclass
class PicPairState:
    """Both chips."""

    master: PicState = field(default_factory=PicState)
    slave: PicState = field(default_factory=PicState)
    intr: bool = False  # the master's INT output (the CPU's INTR input, via the wiring)


def _no_intr(level: bool) -> None:
    del level


class Pic8259Pair:
    """The master/slave pair. `set_irq(line, level)` is an ISA line (0-15);
    `intr` is the master's INT output, reported to `on_intr(level)` when it changes;
    `acknowledge()` is the CPU's INTA cycle and returns the vector; `port_read`,
    `port_write` and `handles_port` are the I/O ports (the chips' and the ELCR)."""

    def __init__(self, *, on_intr: Callable[[bool], None] = _no_intr,
                 firmware: bool = True) -> None:
        """`firmware`: start as a PC firmware leaves the pair (see the module
        docstring); False: both chips blank, waiting for ICW1."""
        self.state = PicPairState()
        self.on_intr = on_intr
        if firmware:
            self.initialise(MASTER_BASE, SLAVE_BASE)

    def initialise(self, master_base: int, slave_base: int, *, masks: tuple[int, int] = (0, 0)
                   ) -> None:
        """The ICW1-ICW4 sequence a PC BIOS writes (edge-triggered, cascade on IR2, 8086
        mode, normal EOI), then OCW1 with `masks`."""
        for port, base, icw3, mask in ((MASTER_PORT, master_base, 1 << CASCADE_IRQ, masks[0]),
                                       (SLAVE_PORT, slave_base, CASCADE_IRQ, masks[1])):
            for offset, value in ((0, ICW1 | ICW1_IC4), (1, base), (1, icw3), (1, ICW4_8086),
                                  (1, mask)):
                self.port_write(port + offset, 1, value)

    # -- the lines and the CPU side --------------------------------------------------------
    def set_irq(self, line: int, level: bool) -> None:
        """ISA IRQ `line` (0-15) goes to `level`."""
        if not 0 <= line < 16:
            raise ValueError(f"8259A pair: IRQ {line} is not an ISA line (0-15)")
        st = self.state
        set_input(st.slave if line >= 8 else st.master, line & 7, level)
        self._update()

    @property
    def intr(self) -> bool:
        return self.state.intr

    def pending_vector(self) -> int | None:
        """The vector INTA would return now, if the master's INT is raised (without
        acknowledging it)."""
        st = self.state
        irq = pending_irq(st.master, master=True)
        if irq is None:
            return None
        if irq == CASCADE_IRQ:
            irq2 = pending_irq(st.slave, master=False)
            return st.slave.irq_base + (7 if irq2 is None else irq2)
        return st.master.irq_base + irq

    def acknowledge(self) -> int:
        """INTA (`pic_read_irq`): the vector of the highest request, moved from IRR to
        ISR on the chip(s) involved; a spurious IRQ 7 (master) or 15 (slave) vector when
        the request is gone."""
        st = self.state
        irq = pending_irq(st.master, master=True)
        if irq is None:
            vector = st.master.irq_base + 7  # spurious on the master: no ISR bit
        elif irq == CASCADE_IRQ:
            irq2 = pending_irq(st.slave, master=False)
            if irq2 is None:
                vector = st.slave.irq_base + 7  # spurious on the slave
            else:
                intack(st.slave, irq2)
                vector = st.slave.irq_base + irq2
            self._cascade()
            intack(st.master, irq)
        else:
            vector = st.master.irq_base + irq
            intack(st.master, irq)
        self._update()
        return vector

    def _cascade(self) -> None:
        """The slave's INT output is the master's IR2 (edge-triggered on the master)."""
        st = self.state
        set_input(st.master, CASCADE_IRQ, pending_irq(st.slave, master=False) is not None)

    def _update(self) -> None:
        """`pic_update_irq`: recompute the cascade and the master's INT output."""
        st = self.state
        self._cascade()
        intr = pending_irq(st.master, master=True) is not None
        if intr != st.intr:
            st.intr = intr
            self.on_intr(intr)

    # -- I/O ports -------------------------------------------------------------------------
    @staticmethod
    def handles_port(port: int) -> bool:
        return port in (MASTER_PORT, MASTER_PORT + 1, SLAVE_PORT, SLAVE_PORT + 1,
                        ELCR_PORT, ELCR_PORT + 1)

    def _chip(self, port: int) -> tuple[PicState, bool]:
        st = self.state
        return (st.master, True) if port & ~1 == MASTER_PORT else (st.slave, False)

    def port_read(self, port: int, size: int) -> int:
        """A read of `size` bytes: each byte from its own port (a wider access reads the
        ports after it, as the ISA bus splits it)."""
        return sum(self._read_byte(port + i) << (8 * i) for i in range(size))

    def _read_byte(self, port: int) -> int:
        if not self.handles_port(port):
            return 0xFF
        if port & ~1 == ELCR_PORT:
            return self.state.master.elcr if port == ELCR_PORT else self.state.slave.elcr
        chip, master = self._chip(port)
        value = read_command(chip, master=master) if port & 1 == 0 else chip.imr
        self._update()  # a poll acknowledges
        return value

    def port_write(self, port: int, size: int, value: int) -> None:
        """A write of `size` bytes, one port per byte."""
        for i in range(size):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, port: int, value: int) -> None:
        if not self.handles_port(port):
            return
        if port & ~1 == ELCR_PORT:
            index = port - ELCR_PORT
            chip = self.state.master if index == 0 else self.state.slave
            chip.elcr = value & ELCR_MASKS[index]
        else:
            chip, _master = self._chip(port)
            if port & 1 == 0:
                write_command(chip, value)
            else:
                write_data(chip, value)
        self._update()
