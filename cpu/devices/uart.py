"""A 16550A UART at I/O port 0x3F8 (COM1), as far as test kernels use one: a polled
transmitter that never keeps the guest waiting, and registers that read back what a
driver wrote. Pure Python: the machine's port handlers call `read` / `write`.

Registers (offset from the base; DLAB is LCR bit 7; National Semiconductor PC16550D
data sheet, "Registers"):

    +0  read: RBR (received byte)      write: THR (byte to send)      DLAB=1: DLL
    +1  IER (interrupt enable, 4 bits)                                DLAB=1: DLM
    +2  read: IIR (interrupt ident.)   write: FCR (FIFO control)
    +3  LCR (line control)             +4  MCR (modem control, 5 bits)
    +5  LSR (line status, read-only)   +6  MSR (modem status, read-only)
    +7  SCR (scratch)

What is modelled
----------------
* Transmission is instantaneous: LSR always reports "transmitter holding register empty"
  (THRE, bit 5) and "transmitter empty" (TEMT, bit 6), so a guest that polls LSR before
  each byte (kvm-unit-tests, our guest images) never waits. A THR write hands the byte
  to `on_byte` (the machine's serial log).
* No interrupt is ever raised: IIR reads "no interrupt pending" (bit 0 = 1), with bits
  7:6 set while the FIFOs are enabled (FCR bit 0), as a 16550A reports them.
* IER, LCR, MCR and SCR read back what was written (IER's and MCR's unused high bits
  read 0); DLL/DLM hold the divisor while DLAB is set.
* Loopback (MCR bit 4): a THR write is received instead of sent (RBR, LSR bit 0 "data
  ready"), and MSR reflects the MCR outputs (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD),
  as drivers' probe routines expect. Without loopback MSR reads CTS | DSR | DCD: a
  terminal is attached. Nothing is ever received from outside.
* FCR bits 1-2 (clear FIFOs) drop a pending received byte.
"""

from __future__ import annotations

from collections.abc import Callable

COM1 = 0x3F8
UART_PORTS = 8  # COM1 .. COM1+7

RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 1 << 7
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 16
LSR_DR = 1 << 0  # data ready
LSR_THRE = 1 << 5  # transmitter holding register empty
LSR_TEMT = 1 << 6  # transmitter empty (holding and shift register)
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 1 << 4, 1 << 5, 1 << 6, 1 << 7
IIR_NO_INT = 1 << 0
IIR_FIFOS = 0xC0  # FIFOs enabled (16550A)
FCR_ENABLE = 1 << 0
FCR_CLEAR_RX = 1 << 1


class Uart16550:
    """One 16550A. `on_byte(b)` receives every byte the guest transmits."""

    def __init__(self, base: int = COM1, on_byte: Callable[[int], None] | None = None) -> None:
        self.base = base
        self.on_byte = on_byte or (lambda b: None)
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.dll = 0
        self.dlm = 0
        self.fifos = False
        self.rx: int | None = None  # a byte received in loopback mode

    def handles(self, port: int) -> bool:
        return self.base <= port < self.base + UART_PORTS

    @property
    def dlab(self) -> bool:
        return bool(self.lcr & LCR_DLAB)

    def read(self, port: int) -> int:
        """The byte register at `port` (one of the UART's eight)."""
        reg = port - self.base
        if reg == RBR_THR:
            if self.dlab:
                return self.dll
            byte, self.rx = self.rx, None
            return byte or 0
        if reg == IER:
            return self.dlm if self.dlab else self.ier
        if reg == IIR_FCR:
            return IIR_NO_INT | (IIR_FIFOS if self.fifos else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx is not None else 0)
        if reg == MSR:
            return self._modem_status()
        assert reg == SCR, f"port {port:#x} is not a UART register"
        return self.scr

    def write(self, port: int, value: int) -> None:
        reg = port - self.base
        value &= 0xFF
        if reg == RBR_THR:
            if self.dlab:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self.rx = value
            else:
                self.on_byte(value)
        elif reg == IER:
            if self.dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif reg == IIR_FCR:
            self.fifos = bool(value & FCR_ENABLE)
            if value & FCR_CLEAR_RX or not self.fifos:
                self.rx = None
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value
        # LSR and MSR are read-only: writes are ignored (as on the 16550A's factory-test
        # LSR write, which idtlab does not model).

    def _modem_status(self) -> int:
        if not self.mcr & MCR_LOOP:
            return MSR_CTS | MSR_DSR | MSR_DCD
        m = self.mcr
        return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
