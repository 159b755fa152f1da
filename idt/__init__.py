"""The pure architectural model of x86-64 event delivery.

Nothing here imports `unicorn` (a test enforces it): the model reads and writes an
abstract CPU state (`idt.state.ArchState`) and guest memory through the
`idt.state.SystemMemory` protocol, so it can be driven by the real machine
(`cpu.machine`) or by a tiny fake in unit tests.

Modules, one per mechanism (SDM Vol. 3A, "Interrupt and Exception Handling"):

- `vectors`       vector numbers, names, fault/trap class, error-code presence, #DF class
- `descriptors`   declared layouts: IDT gate, segment descriptor, 64-bit TSS offsets
- `error_codes`   selector-format and #PF error codes
- `state`         `ArchState`, `Event`, `ArchFault`, the memory protocol
- `deliver`       one gate's delivery: the check order Bochs and QEMU implement, stack
                  selection, the frame
- `double_fault`  the #DF matrix and the "fault during delivery" driver, triple fault
- `iret`          IRETQ, including the NMI-unblocking rule
- `blocking`      which pending NMI/interrupt may be taken: NMI blocking and latch, IF,
                  STI/MOV SS shadows, priority
- `ve`            #VE: the VE-information area, the EPT-violation exit qualification, and
                  when a violation converts to #VE
"""
