/* The hypervisor of the #VE image (Bochs only: on idtlab, idtlab's host model plays it).
 *
 * hyp_main, entered in 64-bit mode from boot32.S:
 *   1. TSSs, an IDT for its own faults, the UART at 115200 baud.
 *   2. The guest's IDT, page tables and the EPT structure (guest.S's header lists what
 *      the guest expects; guest.toml says the same to idtlab).
 *   3. VMXON, a VMCS with EPT, "EPT-violation #VE", the VE-information address, the EPTP
 *      index, NMI exiting + virtual NMIs; VMLAUNCH into guest_entry.
 *   4. Every VM exit is logged as an "idtlog1 host_vmexit ..." record. An EPT violation
 *      (basic reason 48): the page becomes RWX, an event whose delivery was cut short is
 *      re-injected, NMI blocking is restored after an IRET that had unblocked NMIs, and
 *      the guest resumes. An NMI (reason 0; "NMI exiting" is on, as "virtual NMIs"
 *      requires): injected into the guest as a virtual NMI. Anything else ends the run.
 *
 * References: Intel SDM Vol. 3C (rev. 2023), chapters "Virtual Machine Control
 * Structures", "VMX Non-Root Operation", "VM Entries", "VM Exits", "EPT", appendix
 * "VMX Capability Reporting Facility" and "Field Encoding in VMCS".
 * Section titles are cited, not numbers (they drift between revisions).
 */
    .intel_syntax noprefix
    .include "vmx_ve.inc"

    /* MSRs (SDM Vol. 4; Vol. 3D appendix "VMX Capability Reporting Facility") */
    .set MSR_FEATURE_CONTROL, 0x3a
    .set FC_LOCK, 1 << 0
    .set FC_VMXON_OUTSIDE_SMX, 1 << 2
    .set MSR_VMX_BASIC, 0x480
    .set MSR_VMX_PINBASED, 0x481
    .set MSR_VMX_PROCBASED, 0x482
    .set MSR_VMX_EXIT, 0x483
    .set MSR_VMX_ENTRY, 0x484
    .set MSR_VMX_CR0_FIXED0, 0x486
    .set MSR_VMX_CR0_FIXED1, 0x487
    .set MSR_VMX_CR4_FIXED0, 0x488
    .set MSR_VMX_CR4_FIXED1, 0x489
    .set MSR_VMX_PROCBASED2, 0x48b
    .set MSR_VMX_EPT_VPID_CAP, 0x48c
    .set MSR_VMX_TRUE_PINBASED, 0x48d   /* used instead of 0x481..0x484 when */
    .set MSR_VMX_TRUE_PROCBASED, 0x48e  /* IA32_VMX_BASIC bit 55 is set */
    .set MSR_VMX_TRUE_EXIT, 0x48f
    .set MSR_VMX_TRUE_ENTRY, 0x490
    .set BASIC_TRUE_CTLS, 55

    /* VM-execution, exit and entry controls (SDM Vol. 3C "VM-Execution Control Fields") */
    .set PIN_NMI_EXITING, 1 << 3
    .set PIN_VIRTUAL_NMIS, 1 << 5
    .set PROC_SECONDARY, 1 << 31
    .set PROC2_EPT, 1 << 1
    .set PROC2_EPT_VIOLATION_VE, 1 << 18
    .set EXIT_HOST_64, 1 << 9           /* host address-space size */
    .set ENTRY_IA32E_GUEST, 1 << 9

    /* EPT (SDM Vol. 3C "EPT Translation Mechanism", "EPT-Induced VM Exits") */
    .set EPT_R, 1 << 0
    .set EPT_W, 1 << 1
    .set EPT_X, 1 << 2
    .set EPT_RWX, EPT_R | EPT_W | EPT_X
    .set EPT_WB, 6 << 3                 /* memory type of a leaf (bits 5:3) */
    .set EPT_LARGE, 1 << 7
    .set EPT_SUPPRESS_VE, 1 << 63
    .set EPTP_WB_4LEVEL, 6 | (3 << 3)   /* EPTP: memory type WB, page-walk length 4 */
    .set CAP_EPT_WALK4, 1 << 6
    .set CAP_EPT_WB, 1 << 14
    .set CAP_EPT_2M, 1 << 16
    .set CAP_INVEPT, 1 << 20
    .set CAP_INVEPT_SINGLE, 1 << 25
    .set INVEPT_SINGLE, 1
    .set INVEPT_ALL, 2

    /* VMCS field encodings (SDM Vol. 3D appendix "Field Encoding in VMCS") */
    .set F_EPTP_INDEX, 0x0004
    .set F_GUEST_ES_SEL, 0x0800
    .set F_GUEST_CS_SEL, 0x0802
    .set F_GUEST_SS_SEL, 0x0804
    .set F_GUEST_DS_SEL, 0x0806
    .set F_GUEST_FS_SEL, 0x0808
    .set F_GUEST_GS_SEL, 0x080a
    .set F_GUEST_LDTR_SEL, 0x080c
    .set F_GUEST_TR_SEL, 0x080e
    .set F_HOST_ES_SEL, 0x0c00
    .set F_HOST_CS_SEL, 0x0c02
    .set F_HOST_SS_SEL, 0x0c04
    .set F_HOST_DS_SEL, 0x0c06
    .set F_HOST_FS_SEL, 0x0c08
    .set F_HOST_GS_SEL, 0x0c0a
    .set F_HOST_TR_SEL, 0x0c0c
    .set F_EPTP, 0x201a
    .set F_VE_INFO_ADDR, 0x202a
    .set F_GUEST_PHYS_ADDR, 0x2400
    .set F_VMCS_LINK, 0x2800
    .set F_GUEST_DEBUGCTL, 0x2802
    .set F_PIN_CTLS, 0x4000
    .set F_PROC_CTLS, 0x4002
    .set F_EXCEPTION_BITMAP, 0x4004
    .set F_PF_EC_MASK, 0x4006
    .set F_PF_EC_MATCH, 0x4008
    .set F_CR3_TARGET_COUNT, 0x400a
    .set F_EXIT_CTLS, 0x400c
    .set F_EXIT_MSR_STORE_COUNT, 0x400e
    .set F_EXIT_MSR_LOAD_COUNT, 0x4010
    .set F_ENTRY_CTLS, 0x4012
    .set F_ENTRY_MSR_LOAD_COUNT, 0x4014
    .set F_ENTRY_INTR_INFO, 0x4016
    .set F_ENTRY_EXC_EC, 0x4018
    .set F_ENTRY_INSN_LEN, 0x401a
    .set F_PROC2_CTLS, 0x401e
    .set F_VM_INSN_ERROR, 0x4400
    .set F_EXIT_REASON, 0x4402
    .set F_IDT_VECTORING_INFO, 0x4408
    .set F_IDT_VECTORING_EC, 0x440a
    .set F_EXIT_INSN_LEN, 0x440c
    .set F_GUEST_ES_LIMIT, 0x4800
    .set F_GUEST_CS_LIMIT, 0x4802
    .set F_GUEST_SS_LIMIT, 0x4804
    .set F_GUEST_DS_LIMIT, 0x4806
    .set F_GUEST_FS_LIMIT, 0x4808
    .set F_GUEST_GS_LIMIT, 0x480a
    .set F_GUEST_LDTR_LIMIT, 0x480c
    .set F_GUEST_TR_LIMIT, 0x480e
    .set F_GUEST_GDTR_LIMIT, 0x4810
    .set F_GUEST_IDTR_LIMIT, 0x4812
    .set F_GUEST_ES_AR, 0x4814
    .set F_GUEST_CS_AR, 0x4816
    .set F_GUEST_SS_AR, 0x4818
    .set F_GUEST_DS_AR, 0x481a
    .set F_GUEST_FS_AR, 0x481c
    .set F_GUEST_GS_AR, 0x481e
    .set F_GUEST_LDTR_AR, 0x4820
    .set F_GUEST_TR_AR, 0x4822
    .set F_GUEST_INTERRUPTIBILITY, 0x4824
    .set F_GUEST_ACTIVITY, 0x4826
    .set F_GUEST_SYSENTER_CS, 0x482a
    .set F_HOST_SYSENTER_CS, 0x4c00
    .set F_EXIT_QUALIFICATION, 0x6400
    .set F_GUEST_LINEAR_ADDR, 0x640a
    .set F_GUEST_CR0, 0x6800
    .set F_GUEST_CR3, 0x6802
    .set F_GUEST_CR4, 0x6804
    .set F_GUEST_ES_BASE, 0x6806
    .set F_GUEST_CS_BASE, 0x6808
    .set F_GUEST_SS_BASE, 0x680a
    .set F_GUEST_DS_BASE, 0x680c
    .set F_GUEST_FS_BASE, 0x680e
    .set F_GUEST_GS_BASE, 0x6810
    .set F_GUEST_LDTR_BASE, 0x6812
    .set F_GUEST_TR_BASE, 0x6814
    .set F_GUEST_GDTR_BASE, 0x6816
    .set F_GUEST_IDTR_BASE, 0x6818
    .set F_GUEST_DR7, 0x681a
    .set F_GUEST_RSP, 0x681c
    .set F_GUEST_RIP, 0x681e
    .set F_GUEST_RFLAGS, 0x6820
    .set F_GUEST_PENDING_DBG, 0x6822
    .set F_GUEST_SYSENTER_ESP, 0x6824
    .set F_GUEST_SYSENTER_EIP, 0x6826
    .set F_HOST_CR0, 0x6c00
    .set F_HOST_CR3, 0x6c02
    .set F_HOST_CR4, 0x6c04
    .set F_HOST_FS_BASE, 0x6c06
    .set F_HOST_GS_BASE, 0x6c08
    .set F_HOST_TR_BASE, 0x6c0a
    .set F_HOST_GDTR_BASE, 0x6c0c
    .set F_HOST_IDTR_BASE, 0x6c0e
    .set F_HOST_SYSENTER_ESP, 0x6c10
    .set F_HOST_SYSENTER_EIP, 0x6c12
    .set F_HOST_RSP, 0x6c14
    .set F_HOST_RIP, 0x6c16

    /* Exit information (SDM Vol. 3C "VM-Exit Information Fields") */
    .set EXIT_REASON_EPT_VIOLATION, 48
    .set EXIT_REASON_EXCEPTION_OR_NMI, 0
    .set INTR_INFO_NMI, 0x80000202          /* valid, type 2 (NMI), vector 2 */
    .set F_EXIT_INTR_INFO, 0x4404
    .set QUAL_NMI_UNBLOCKED_BY_IRET, 1 << 12
    .set VECTORING_VALID, 1 << 31
    .set VECTORING_EC_VALID, 1 << 11
    .set VECTORING_INFO_BITS, 0x80000fff    /* valid, EC valid, type, vector */
    .set BLOCKING_BY_NMI, 1 << 3            /* guest interruptibility state */

    .set CR4_VMXE, 1 << 13
    .set CPUID1_ECX_VMX, 1 << 5
    .set PTE_P_RW_US, 0x7
    .set PDE_2M_US, 0x87                    /* present, writable, user, 2-MiB page */
    .set PDE_2M_UC, 0x9b                    /* present, writable, PWT, PCD, 2-MiB page */
    .set IMAGE_REGION, 0x200000             /* the 2-MiB region that holds the image */
    .set APIC_BASE, 0xfee00000              /* local xAPIC page (GiB 3, 2-MiB page 0x1f7) */
    .set EPT_UC, 0 << 3

/* VMWRITE_IMM field, value: write a VMCS field, fail loudly if VMWRITE does. */
.macro VMWRITE_IMM field, value
    mov edx, \field
    mov rax, \value
    call vmwrite_checked
.endm

/* VMREAD_TO reg, field */
.macro VMREAD_TO reg, field
    mov edx, \field
    vmread \reg, rdx
.endm

    .text
    .code64
    .globl hyp_main, vmexit_entry

hyp_main:
    call setup_tss
    call setup_host_idt
    call setup_uart
    call setup_guest_idt
    call setup_guest_paging
    call setup_ept
    call vmx_on
    call vmcs_setup
    mov byte ptr [rip + launched], 1
    vmlaunch
    /* Only reached if VMLAUNCH itself failed (VMfailInvalid or VMfailValid). */
    lea rsi, [rip + e_vmlaunch]
    jmp setup_vmfail

/* ---------------------------------------------------------------------------------- */
/* Descriptor tables */

/* Fill in a 16-byte 64-bit TSS descriptor: RDI = descriptor, RAX = base, CL = type. */
set_tss_desc:
    mov rdx, rax
    and edx, 0xffff
    shl rdx, 16
    or rdx, 0x67                        /* limit: 104 bytes */
    mov r8, rax
    shr r8, 16
    and r8, 0xff
    shl r8, 32
    or rdx, r8
    movzx r8, cl
    or r8, 0x80                         /* present */
    shl r8, 40
    or rdx, r8
    mov r8, rax
    shr r8, 24
    and r8, 0xff
    shl r8, 56
    or rdx, r8
    mov [rdi], rdx
    mov r8, rax
    shr r8, 32
    mov [rdi + 8], r8
    ret

setup_tss:
    lea rdi, [rip + hyp_gdt_guest_tss]
    lea rax, [rip + guest_tss]
    mov cl, 0xb                         /* busy 64-bit TSS (what VM entry wants in TR) */
    call set_tss_desc
    lea rdi, [rip + hyp_gdt_host_tss]
    lea rax, [rip + host_tss]
    mov cl, 0x9                         /* available 64-bit TSS; LTR marks it busy */
    call set_tss_desc
    mov ax, SEL_HOST_TSS
    ltr ax
    ret

/* Write a 64-bit interrupt gate: RDI = IDT, ECX = vector, RAX = handler, DL = IST. */
set_gate:
    push rbx
    mov rbx, rcx
    shl rbx, 4
    add rbx, rdi
    mov r8, rax
    and r8, 0xffff
    mov r9, SEL_CODE
    shl r9, 16
    or r8, r9
    movzx r9, dl
    shl r9, 32
    or r8, r9
    mov r9, 0x8e                        /* present, DPL 0, 64-bit interrupt gate */
    shl r9, 40
    or r8, r9
    mov r9, rax
    shr r9, 16
    and r9, 0xffff
    shl r9, 48
    or r8, r9
    mov [rbx], r8
    mov r9, rax
    shr r9, 32
    mov [rbx + 8], r9
    pop rbx
    ret

/* The hypervisor's own IDT: vectors 0..31 -> host_fault_<n>, which report and stop. */
setup_host_idt:
    lea rdi, [rip + host_idt]
    xor ecx, ecx
1:  lea rax, [rip + host_fault_stubs]
    mov rdx, rcx
    shl rdx, 4                          /* each stub is 16 bytes */
    add rax, rdx
    xor edx, edx
    call set_gate
    inc ecx
    cmp ecx, 32
    jb 1b
    lidt [rip + host_idt_ptr]
    ret

/* The UART: 115200 baud (divisor 1), 8N1. Only the hypervisor touches the divisor, so the
 * guest part never writes anything but data to port 0x3F8. */
setup_uart:
    mov dx, 0x3fb
    mov al, 0x80                        /* LCR: DLAB */
    out dx, al
    mov dx, 0x3f8
    mov al, 1                           /* divisor latch low */
    out dx, al
    mov dx, 0x3f9
    xor eax, eax                        /* divisor latch high */
    out dx, al
    mov dx, 0x3fb
    mov al, 0x03                        /* 8 data bits, no parity, 1 stop bit */
    out dx, al
    ret

/* The guest's IDT (what guest.toml's [idt] says): NMI on IST NMI_IST (0: the current
 * stack), #BP on IST2, #VE on IST1, the other vectors not present. */
setup_guest_idt:
    lea rdi, [rip + guest_idt]
    mov ecx, 2
    lea rax, [rip + guest_nmi_handler]
    mov dl, NMI_IST
    call set_gate
    mov ecx, 3
    lea rax, [rip + guest_bp_handler]
    mov dl, 2
    call set_gate
    mov ecx, 20
    lea rax, [rip + guest_ve_handler]
    mov dl, 1
    call set_gate
    ret

/* ---------------------------------------------------------------------------------- */
/* Guest paging and EPT */

/* The guest's page tables: identity for the first GiB with 2-MiB pages (present,
 * writable, user, as idtlab's machine), except the image's region, mapped with 4-KiB
 * pages so that linear alias_page can map guest-physical page_a (guest.toml [[pages]]). */
setup_guest_paging:
    lea rax, [rip + guest_pdpt]
    or rax, PTE_P_RW_US
    mov [rip + guest_pml4], rax
    lea rax, [rip + guest_pd]
    or rax, PTE_P_RW_US
    mov [rip + guest_pdpt], rax
    lea rdi, [rip + guest_pd]
    xor ecx, ecx
1:  mov rax, rcx
    shl rax, 21
    or rax, PDE_2M_US
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, 512
    jb 1b
    lea rax, [rip + guest_pt]
    or rax, PTE_P_RW_US
    mov [rdi + (IMAGE_REGION >> 21) * 8], rax
    lea rdi, [rip + guest_pt]
    xor ecx, ecx
2:  mov rax, rcx
    shl rax, 12
    add rax, IMAGE_REGION
    or rax, PTE_P_RW_US
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, 512
    jb 2b
    mov rcx, offset alias_page
    sub rcx, IMAGE_REGION
    shr rcx, 12
    mov rax, offset page_a
    or rax, PTE_P_RW_US
    mov [rdi + rcx * 8], rax
    /* The local APIC page, uncached, as idtlab's machine maps it. */
    lea rax, [rip + guest_pd_apic]
    or rax, PTE_P_RW_US
    mov [rip + guest_pdpt + (APIC_BASE >> 30) * 8], rax
    mov rax, APIC_BASE | PDE_2M_UC
    mov [rip + guest_pd_apic + ((APIC_BASE >> 21) & 511) * 8], rax
    ret

/* The EPT structure (SDM Vol. 3C "EPT Translation Mechanism"): identity for the first
 * GiB, RWX, write-back; 2-MiB leaves except the image's region, which has 4-KiB leaves so
 * that each test page gets its own rights from ept_overrides. */
setup_ept:
    lea rax, [rip + ept_pdpt]
    or rax, EPT_RWX
    mov [rip + ept_pml4], rax
    lea rax, [rip + ept_pd]
    or rax, EPT_RWX
    mov [rip + ept_pdpt], rax
    lea rdi, [rip + ept_pd]
    xor ecx, ecx
1:  mov rax, rcx
    shl rax, 21
    or rax, EPT_RWX | EPT_WB | EPT_LARGE
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, 512
    jb 1b
    lea rax, [rip + ept_pt]
    or rax, EPT_RWX                     /* a non-leaf entry: bits 7:3 must be 0 */
    mov [rdi + (IMAGE_REGION >> 21) * 8], rax
    lea rdi, [rip + ept_pt]
    xor ecx, ecx
2:  mov rax, rcx
    shl rax, 12
    add rax, IMAGE_REGION
    or rax, EPT_RWX | EPT_WB
    mov [rdi + rcx * 8], rax
    inc ecx
    cmp ecx, 512
    jb 2b
    /* ept_overrides: (GPA, rights, suppress-#VE) triples, ending in GPA 0. A not-present
     * entry (no rights) keeps only its suppress-#VE bit. */
    lea rsi, [rip + ept_overrides]
3:  mov rax, [rsi]
    test rax, rax
    jz 5f
    mov rcx, rax
    sub rcx, IMAGE_REGION
    shr rcx, 12
    mov rdx, [rsi + 8]
    test rdx, rdx
    jz 4f
    or rax, rdx
    or rax, EPT_WB
    or rax, [rsi + 16]
    mov [rdi + rcx * 8], rax
    add rsi, 24
    jmp 3b
4:  mov rax, [rsi + 16]
    mov [rdi + rcx * 8], rax
    add rsi, 24
    jmp 3b
5:  /* The local APIC page: identity, RWX, uncacheable (its accesses reach the APIC: no
     * "virtualize APIC accesses" here). */
    lea rax, [rip + ept_pd_apic]
    or rax, EPT_RWX
    mov [rip + ept_pdpt + (APIC_BASE >> 30) * 8], rax
    mov rax, APIC_BASE | EPT_RWX | EPT_UC | EPT_LARGE
    mov [rip + ept_pd_apic + ((APIC_BASE >> 21) & 511) * 8], rax
    ret

/* ---------------------------------------------------------------------------------- */
/* VMX operation */

/* vmx_on (SDM Vol. 3C "Enabling and Entering VMX Operation"): CPUID.1:ECX.VMX, the
 * IA32_FEATURE_CONTROL lock, CR0/CR4 per the fixed-bit MSRs (CR4.VMXE among them),
 * then VMXON with the revision identifier in the VMXON region. */
vmx_on:
    mov eax, 1
    cpuid
    test ecx, CPUID1_ECX_VMX
    lea rsi, [rip + e_no_vmx]
    jz setup_fail
    mov ecx, MSR_FEATURE_CONTROL
    rdmsr
    test eax, FC_LOCK
    jnz 1f
    or eax, FC_LOCK | FC_VMXON_OUTSIDE_SMX
    wrmsr
1:  test eax, FC_VMXON_OUTSIDE_SMX
    lea rsi, [rip + e_feature_control]
    jz setup_fail
    mov ecx, MSR_VMX_CR0_FIXED0
    call rdmsr64
    mov rbx, cr0
    or rbx, rax
    mov ecx, MSR_VMX_CR0_FIXED1
    call rdmsr64
    and rbx, rax
    mov cr0, rbx
    mov rbx, cr4
    or rbx, CR4_VMXE
    mov ecx, MSR_VMX_CR4_FIXED0
    call rdmsr64
    or rbx, rax
    mov ecx, MSR_VMX_CR4_FIXED1
    call rdmsr64
    and rbx, rax
    mov cr4, rbx
    mov ecx, MSR_VMX_BASIC
    call rdmsr64
    mov [rip + vmx_basic], rax
    and eax, 0x7fffffff                 /* bits 30:0: VMCS revision identifier */
    mov [rip + vmxon_region], eax
    mov [rip + vmcs_region], eax
    vmxon [rip + vmxon_region_pa]
    lea rsi, [rip + e_vmxon]
    jbe setup_vmfail                    /* CF or ZF: VMfailInvalid / VMfailValid */
    vmclear [rip + vmcs_region_pa]
    lea rsi, [rip + e_vmclear]
    jbe setup_vmfail
    vmptrld [rip + vmcs_region_pa]
    lea rsi, [rip + e_vmptrld]
    jbe setup_vmfail
    ret

/* rdmsr64: RAX = MSR[ECX]. */
rdmsr64:
    push rdx
    rdmsr
    shl rdx, 32
    or rax, rdx
    pop rdx
    ret

/* adjust_ctls: EBX = wanted control bits, ECX = capability MSR; returns EAX = the value
 * to write: the allowed-0 settings (low half: bits that must be 1) plus the wanted bits,
 * limited to the allowed-1 settings (high half) (SDM Vol. 3D "VMX Capability Reporting
 * Facility"). A wanted bit the CPU cannot set stops the run. */
adjust_ctls:
    push rdx
    mov [rip + failed_msr], rcx
    rdmsr
    or eax, ebx
    and eax, edx
    mov edx, eax
    and edx, ebx
    cmp edx, ebx
    jne 1f
    pop rdx
    ret
1:  xor edx, ebx                        /* the wanted bits the CPU cannot set */
    mov [rip + missing_bits], rdx
    mov byte ptr [rip + report_missing], 1
    lea rsi, [rip + e_controls]
    jmp setup_fail

/* pick_ctl_msr: ECX = the TRUE_ capability MSR if IA32_VMX_BASIC bit 55 says they exist,
 * else the original one (ECX = true MSR, EDX = original on input). */
pick_ctl_msr:
    bt qword ptr [rip + vmx_basic], BASIC_TRUE_CTLS
    jc 1f
    mov ecx, edx
1:  ret

vmcs_setup:
    /* Controls (SDM Vol. 3C "VM-Execution Control Fields", "VM-Exit Control Fields",
     * "VM-Entry Control Fields") */
    mov ecx, MSR_VMX_TRUE_PINBASED
    mov edx, MSR_VMX_PINBASED
    call pick_ctl_msr
    mov ebx, PIN_NMI_EXITING | PIN_VIRTUAL_NMIS  /* virtual NMIs need NMI exiting */
    call adjust_ctls
    VMWRITE_IMM F_PIN_CTLS, rax
    mov ecx, MSR_VMX_TRUE_PROCBASED
    mov edx, MSR_VMX_PROCBASED
    call pick_ctl_msr
    mov ebx, PROC_SECONDARY
    call adjust_ctls
    VMWRITE_IMM F_PROC_CTLS, rax
    mov ecx, MSR_VMX_PROCBASED2
    mov ebx, PROC2_EPT | PROC2_EPT_VIOLATION_VE
    call adjust_ctls
    VMWRITE_IMM F_PROC2_CTLS, rax
    mov ecx, MSR_VMX_TRUE_EXIT
    mov edx, MSR_VMX_EXIT
    call pick_ctl_msr
    mov ebx, EXIT_HOST_64
    call adjust_ctls
    VMWRITE_IMM F_EXIT_CTLS, rax
    mov ecx, MSR_VMX_TRUE_ENTRY
    mov edx, MSR_VMX_ENTRY
    call pick_ctl_msr
    mov ebx, ENTRY_IA32E_GUEST
    call adjust_ctls
    VMWRITE_IMM F_ENTRY_CTLS, rax

    /* EPT capabilities: 4-level walk, write-back, 2-MiB pages, INVEPT. */
    mov ecx, MSR_VMX_EPT_VPID_CAP
    call rdmsr64
    mov [rip + ept_caps], rax
    mov rbx, CAP_EPT_WALK4 | CAP_EPT_WB | CAP_EPT_2M | CAP_INVEPT
    and rax, rbx
    cmp rax, rbx
    lea rsi, [rip + e_ept_caps]
    jne setup_fail
    lea rax, [rip + ept_pml4]
    or rax, EPTP_WB_4LEVEL
    mov [rip + invept_desc], rax
    VMWRITE_IMM F_EPTP, rax

    /* Constant fields, then the CRs and the host's current state. */
    lea rsi, [rip + vmcs_constants]
1:  mov rdx, [rsi]
    cmp rdx, -1
    je 2f
    mov rax, [rsi + 8]
    call vmwrite_checked
    add rsi, 16
    jmp 1b
2:  mov rax, cr0
    VMWRITE_IMM F_HOST_CR0, rax
    VMWRITE_IMM F_GUEST_CR0, rax
    mov rax, cr4
    VMWRITE_IMM F_HOST_CR4, rax
    VMWRITE_IMM F_GUEST_CR4, rax
    mov rax, cr3
    VMWRITE_IMM F_HOST_CR3, rax
    ret

/* vmwrite_checked: VMCS field EDX := RAX. */
vmwrite_checked:
    vmwrite rdx, rax
    jbe 1f
    ret
1:  mov [rip + failed_field], rdx
    lea rsi, [rip + e_vmwrite]
    jmp setup_vmfail

/* ---------------------------------------------------------------------------------- */
/* VM exits */

/* Host RIP for every VM exit; host RSP = host_stack_top. The guest's general-purpose
 * registers are live here (a VM exit saves only RIP/RSP/RFLAGS and the rest of the guest
 * state area), so save them all and restore them before VMRESUME. */
vmexit_entry:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    VMREAD_TO rax, F_EXIT_REASON
    mov [rip + exit_reason], rax
    VMREAD_TO rax, F_EXIT_QUALIFICATION
    mov [rip + exit_qual], rax
    VMREAD_TO rax, F_GUEST_LINEAR_ADDR
    mov [rip + exit_gla], rax
    VMREAD_TO rax, F_GUEST_PHYS_ADDR
    mov [rip + exit_gpa], rax
    VMREAD_TO rax, F_GUEST_RIP
    mov [rip + exit_rip], rax
    VMREAD_TO rax, F_IDT_VECTORING_INFO
    mov [rip + exit_vectoring], rax
    VMREAD_TO rax, F_EXIT_INTR_INFO
    mov [rip + exit_intr_info], rax

    lea rsi, [rip + h_vmexit]
    call log_puts
    lea rdi, [rip + exit_record]
    cmp qword ptr [rip + exit_reason], EXIT_REASON_EPT_VIOLATION
    je 1f
    lea rdi, [rip + other_exit_record]
1:  call host_fields
    call log_nl
    cmp qword ptr [rip + exit_reason], EXIT_REASON_EXCEPTION_OR_NMI
    jne 5f
    /* An NMI while the guest ran ("NMI exiting"): give it to the guest as a virtual NMI
     * (SDM Vol. 3C "Event Injection"; with "virtual NMIs", delivering it sets
     * virtual-NMI blocking until the guest's next IRET). */
    mov rax, [rip + exit_intr_info]
    cmp eax, INTR_INFO_NMI
    lea rsi, [rip + e_unexpected_exit]
    jne host_fail
    VMWRITE_IMM F_ENTRY_INTR_INFO, INTR_INFO_NMI
    jmp resume_guest
5:  cmp qword ptr [rip + exit_reason], EXIT_REASON_EPT_VIOLATION
    lea rsi, [rip + e_unexpected_exit]
    jne host_fail

    /* An IRET that unblocked (virtual) NMIs and then hit the violation: re-establish the
     * blocking before resuming, since the IRET re-executes (SDM Vol. 3C "NMI Unblocking
     * Due to IRET"; only when the exit did not occur during event delivery). */
    test qword ptr [rip + exit_qual], QUAL_NMI_UNBLOCKED_BY_IRET
    jz 2f
    bt qword ptr [rip + exit_vectoring], 31
    jc 2f
    VMREAD_TO rax, F_GUEST_INTERRUPTIBILITY
    or rax, BLOCKING_BY_NMI
    VMWRITE_IMM F_GUEST_INTERRUPTIBILITY, rax
2:
    /* A violation during event delivery: re-inject the event from the IDT-vectoring
     * information, with its error code and (for software interrupts and exceptions) the
     * instruction length (SDM Vol. 3C "Information for VM Exits During Event Delivery",
     * "Event Injection"). */
    mov rax, [rip + exit_vectoring]
    bt rax, 31
    jnc 3f
    and eax, VECTORING_INFO_BITS
    VMWRITE_IMM F_ENTRY_INTR_INFO, rax
    VMREAD_TO rax, F_IDT_VECTORING_EC
    VMWRITE_IMM F_ENTRY_EXC_EC, rax
    VMREAD_TO rax, F_EXIT_INSN_LEN
    VMWRITE_IMM F_ENTRY_INSN_LEN, rax
3:
    /* Make the 4-KiB page RWX (only the image's region has 4-KiB EPT leaves). */
    mov rax, [rip + exit_gpa]
    and rax, -4096
    mov rcx, rax
    sub rcx, IMAGE_REGION
    cmp rcx, 0x200000
    lea rsi, [rip + e_gpa_outside]
    jae host_fail
    shr rcx, 12
    or rax, EPT_RWX | EPT_WB
    lea rdi, [rip + ept_pt]
    mov [rdi + rcx * 8], rax
    /* Drop cached translations derived from the old entry (SDM Vol. 3C "Invalidation of
     * TLBs and Paging-Structure Caches"). */
    mov eax, INVEPT_ALL
    bt qword ptr [rip + ept_caps], 25
    jnc 4f
    mov eax, INVEPT_SINGLE
4:  invept rax, [rip + invept_desc]
    lea rsi, [rip + e_invept]
    jbe host_vmfail

resume_guest:
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    vmresume
    lea rsi, [rip + e_vmresume]
    jmp host_vmfail

/* host_fields: RDI = table of (" key=" string, address of a qword), ending in 0. */
host_fields:
1:  mov rsi, [rdi]
    test rsi, rsi
    jz 2f
    mov rax, [rdi + 8]
    mov rax, [rax]
    call log_kv
    add rdi, 16
    jmp 1b
2:  ret

/* ---------------------------------------------------------------------------------- */
/* Failures: "idtlog1 host_<what> FAIL <reason>", the end record, exit status 1. */

/* setup_vmfail / host_vmfail: RSI = what failed; a VMX instruction reported VMfail. With
 * ZF (VMfailValid) the VM-instruction error field says why. */
setup_vmfail:
host_vmfail:
    mov qword ptr [rip + vm_insn_error], -1
    jc 1f                               /* VMfailInvalid: no current VMCS */
    mov edx, F_VM_INSN_ERROR
    vmread rax, rdx
    mov [rip + vm_insn_error], rax
1:  mov byte ptr [rip + report_vm_error], 1
    /* fall through */
setup_fail:
host_fail:
    mov rsp, offset host_stack_top
    push rsi
    cmp byte ptr [rip + launched], 0
    jne 1f
    lea rsi, [rip + h_begin]            /* nothing printed yet: open the log */
    call log_puts
    lea rsi, [rip + h_setup_fail]
    jmp 2f
1:  lea rsi, [rip + h_vmexit_fail]
2:  call log_puts
    pop rsi
    call log_puts
    cmp byte ptr [rip + report_vm_error], 0
    je 3f
    mov rax, [rip + vm_insn_error]
    lea rsi, [rip + k_error]
    call log_kv
    mov rax, [rip + failed_field]
    lea rsi, [rip + k_field]
    call log_kv
3:  cmp byte ptr [rip + report_missing], 0
    je 5f
    mov rax, [rip + failed_msr]
    lea rsi, [rip + k_msr]
    call log_kv
    mov rax, [rip + missing_bits]
    lea rsi, [rip + k_missing]
    call log_kv
5:  cmp byte ptr [rip + report_vector], 0
    je 4f
    mov rax, [rip + fault_vector]
    lea rsi, [rip + k_vector]
    call log_kv
4:  call log_nl
    lea rsi, [rip + h_end]
    call log_puts
    mov rax, [rip + guest_pass]
    lea rsi, [rip + k_pass]
    call log_kv
    mov rax, [rip + guest_fail]
    inc rax
    lea rsi, [rip + k_fail]
    call log_kv
    call log_nl
    mov al, 1
    jmp guest_exit                      /* the same exit sequence as the guest's */

/* Faults in the hypervisor itself: "... FAIL fault in the hypervisor vector=0x<n>". */
    .balign 16
host_fault_stubs:
    .set n, 0
    .rept 32
    .balign 16
    push n
    jmp host_fault
    .set n, n + 1
    .endr
host_fault:
    pop rax
    mov [rip + fault_vector], rax
    mov byte ptr [rip + report_vector], 1
    lea rsi, [rip + e_fault]
    jmp host_fail

/* ---------------------------------------------------------------------------------- */

    .section .rodata
h_begin:            .asciz "idtlog1 begin vmx_ve\n"
h_end:              .asciz "idtlog1 end vmx_ve"
h_vmexit:           .asciz "idtlog1 host_vmexit"
h_setup_fail:       .asciz "idtlog1 host_setup FAIL "
h_vmexit_fail:      .asciz "idtlog1 host_vmexit FAIL "
k_pass:             .asciz " pass="
k_fail:             .asciz " fail="
k_error:            .asciz " error="
k_field:            .asciz " field="
k_vector:           .asciz " vector="
k_msr:              .asciz " msr="
k_missing:          .asciz " missing="
k_reason:           .asciz " reason="
k_qual:             .asciz " qual="
k_gla:              .asciz " gla="
k_gpa:              .asciz " gpa="
k_rip:              .asciz " rip="
k_vectoring:        .asciz " idt_vectoring="
k_intr_info:        .asciz " intr_info="
e_no_vmx:           .asciz "no VMX (CPUID.1:ECX bit 5)"
e_feature_control:  .asciz "VMXON disabled by IA32_FEATURE_CONTROL"
e_controls:         .asciz "a wanted VMX control is not allowed"
e_ept_caps:         .asciz "EPT lacks 4-level walks, WB, 2-MiB pages or INVEPT"
e_vmxon:            .asciz "VMXON"
e_vmclear:          .asciz "VMCLEAR"
e_vmptrld:          .asciz "VMPTRLD"
e_vmwrite:          .asciz "VMWRITE"
e_vmlaunch:         .asciz "VMLAUNCH"
e_vmresume:         .asciz "VMRESUME"
e_invept:           .asciz "INVEPT"
e_unexpected_exit:  .asciz "unexpected VM exit"
e_gpa_outside:      .asciz "EPT violation outside the image"
e_fault:            .asciz "fault in the hypervisor"

    .balign 8
exit_record:
    .quad k_reason, exit_reason
    .quad k_qual, exit_qual
    .quad k_gla, exit_gla
    .quad k_gpa, exit_gpa
    .quad k_rip, exit_rip
    .quad k_vectoring, exit_vectoring
    .quad 0
other_exit_record:
    .quad k_reason, exit_reason
    .quad k_qual, exit_qual
    .quad k_rip, exit_rip
    .quad k_vectoring, exit_vectoring
    .quad k_intr_info, exit_intr_info
    .quad 0

/* EPT rights that differ from identity RWX (guest.S's header; guest.toml [[ept]]):
 * GPA, rights, suppress-#VE. */
ept_overrides:
    .quad page_a, 0, 0
    .quad page_b, 0, 0
    .quad page_c, EPT_R, 0
    .quad page_d, 0, EPT_SUPPRESS_VE
    .quad page_e, EPT_R | EPT_W, 0
    .quad bp_stack_top_page, EPT_R, 0
    .quad page_f, 0, 0
    .quad 0

/* VMCS fields with constant values: (encoding, value), ending in -1. The guest state is
 * checked at VM entry (SDM Vol. 3C "Checks on the Guest State Area"): a 64-bit CS (L=1),
 * an accessed writable SS/DS, a busy 64-bit TSS in TR, an unusable LDTR, RFLAGS bit 1,
 * VMCS link pointer all ones. */
vmcs_constants:
    .quad F_EXCEPTION_BITMAP, 0          /* #VE goes through the guest's IDT */
    .quad F_PF_EC_MASK, 0
    .quad F_PF_EC_MATCH, 0
    .quad F_CR3_TARGET_COUNT, 0
    .quad F_EXIT_MSR_STORE_COUNT, 0
    .quad F_EXIT_MSR_LOAD_COUNT, 0
    .quad F_ENTRY_MSR_LOAD_COUNT, 0
    .quad F_ENTRY_INTR_INFO, 0
    .quad F_VE_INFO_ADDR, ve_info
    .quad F_EPTP_INDEX, EPTP_INDEX
    .quad F_HOST_ES_SEL, SEL_DATA
    .quad F_HOST_CS_SEL, SEL_CODE
    .quad F_HOST_SS_SEL, SEL_DATA
    .quad F_HOST_DS_SEL, SEL_DATA
    .quad F_HOST_FS_SEL, SEL_DATA
    .quad F_HOST_GS_SEL, SEL_DATA
    .quad F_HOST_TR_SEL, SEL_HOST_TSS
    .quad F_HOST_FS_BASE, 0
    .quad F_HOST_GS_BASE, 0
    .quad F_HOST_TR_BASE, host_tss
    .quad F_HOST_GDTR_BASE, hyp_gdt
    .quad F_HOST_IDTR_BASE, host_idt
    .quad F_HOST_SYSENTER_CS, 0
    .quad F_HOST_SYSENTER_ESP, 0
    .quad F_HOST_SYSENTER_EIP, 0
    .quad F_HOST_RSP, host_stack_top
    .quad F_HOST_RIP, vmexit_entry
    .quad F_GUEST_CS_SEL, SEL_CODE
    .quad F_GUEST_CS_BASE, 0
    .quad F_GUEST_CS_LIMIT, 0xffffffff
    .quad F_GUEST_CS_AR, 0xa09b          /* G, L, P, DPL 0, code execute/read accessed */
    .quad F_GUEST_SS_SEL, SEL_DATA
    .quad F_GUEST_SS_BASE, 0
    .quad F_GUEST_SS_LIMIT, 0xffffffff
    .quad F_GUEST_SS_AR, 0xc093          /* G, D/B, P, DPL 0, data read/write accessed */
    .quad F_GUEST_DS_SEL, SEL_DATA
    .quad F_GUEST_DS_BASE, 0
    .quad F_GUEST_DS_LIMIT, 0xffffffff
    .quad F_GUEST_DS_AR, 0xc093
    .quad F_GUEST_ES_SEL, SEL_DATA
    .quad F_GUEST_ES_BASE, 0
    .quad F_GUEST_ES_LIMIT, 0xffffffff
    .quad F_GUEST_ES_AR, 0xc093
    .quad F_GUEST_FS_SEL, SEL_DATA
    .quad F_GUEST_FS_BASE, 0
    .quad F_GUEST_FS_LIMIT, 0xffffffff
    .quad F_GUEST_FS_AR, 0xc093
    .quad F_GUEST_GS_SEL, SEL_DATA
    .quad F_GUEST_GS_BASE, 0
    .quad F_GUEST_GS_LIMIT, 0xffffffff
    .quad F_GUEST_GS_AR, 0xc093
    .quad F_GUEST_LDTR_SEL, 0
    .quad F_GUEST_LDTR_BASE, 0
    .quad F_GUEST_LDTR_LIMIT, 0
    .quad F_GUEST_LDTR_AR, 0x10000       /* unusable */
    .quad F_GUEST_TR_SEL, SEL_GUEST_TSS
    .quad F_GUEST_TR_BASE, guest_tss
    .quad F_GUEST_TR_LIMIT, 0x67
    .quad F_GUEST_TR_AR, 0x8b            /* P, busy 64-bit TSS */
    .quad F_GUEST_GDTR_BASE, hyp_gdt
    .quad F_GUEST_GDTR_LIMIT, hyp_gdt_end - hyp_gdt - 1
    .quad F_GUEST_IDTR_BASE, guest_idt
    .quad F_GUEST_IDTR_LIMIT, 256 * 16 - 1
    .quad F_GUEST_CR3, guest_pml4
    .quad F_GUEST_DR7, 0x400
    .quad F_GUEST_RSP, guest_stack_top
    .quad F_GUEST_RIP, guest_entry
    .quad F_GUEST_RFLAGS, 0x2
    .quad F_GUEST_PENDING_DBG, 0
    .quad F_GUEST_INTERRUPTIBILITY, 0
    .quad F_GUEST_ACTIVITY, 0            /* active */
    .quad F_GUEST_SYSENTER_CS, 0
    .quad F_GUEST_SYSENTER_ESP, 0
    .quad F_GUEST_SYSENTER_EIP, 0
    .quad F_GUEST_DEBUGCTL, 0
    .quad F_VMCS_LINK, -1
    .quad -1

/* ---------------------------------------------------------------------------------- */

    .data
    .balign 8
    .globl hyp_gdt_ptr32
hyp_gdt_ptr32:
    .word hyp_gdt_end - hyp_gdt - 1
    .long hyp_gdt

/* The GDT, shared by the hypervisor and the guest (the guest uses the same selectors as
 * idtlab's machine: 0x08 code, 0x10 data, 0x1b/0x23 user, 0x28 its TSS). The TSS
 * descriptors' bases are filled in by hyp_main. */
    .balign 16
    .globl hyp_gdt, hyp_gdt_end, hyp_gdt_guest_tss, hyp_gdt_host_tss
hyp_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff        /* 0x10: data, DPL 0 */
    .quad 0x00affa000000ffff        /* 0x18: 64-bit code, DPL 3 */
    .quad 0x00cff2000000ffff        /* 0x20: data, DPL 3 */
hyp_gdt_guest_tss:                      /* 0x28: the guest's TSS (16 bytes) */
    .quad 0, 0
hyp_gdt_host_tss:                       /* 0x38: the hypervisor's TSS (16 bytes) */
    .quad 0, 0
hyp_gdt_end:


    .balign 8
vmxon_region_pa:    .quad vmxon_region
vmcs_region_pa:     .quad vmcs_region
vmx_basic:          .quad 0
ept_caps:           .quad 0
exit_reason:        .quad 0
exit_qual:          .quad 0
exit_gla:           .quad 0
exit_gpa:           .quad 0
exit_rip:           .quad 0
exit_vectoring:     .quad 0
exit_intr_info:     .quad 0
vm_insn_error:      .quad 0
failed_field:       .quad 0
launched:           .byte 0
report_vm_error:    .byte 0
report_vector:      .byte 0
report_missing:     .byte 0
    .balign 8
fault_vector:       .quad 0
failed_msr:         .quad 0
missing_bits:       .quad 0
    .balign 16
invept_desc:        .quad 0, 0          /* EPTP, reserved */
host_idt_ptr:
    .word 32 * 16 - 1
    .quad host_idt

/* The guest's TSS (guest.toml [tss]): IST1 for #VE, IST2 for #BP, IST3 for NMIs if
 * NMI_IST = 3. */
    .balign 16
guest_tss:
    .long 0                             /* reserved */
    .quad guest_stack_top               /* RSP0 */
    .quad 0, 0                          /* RSP1, RSP2 */
    .quad 0                             /* reserved */
    .quad ve_stack_top                  /* IST1 */
    .quad bp_stack_top                  /* IST2 */
    .quad nmi_stack_top                 /* IST3 */
    .quad 0, 0, 0, 0                    /* IST4..IST7 */
    .quad 0                             /* reserved */
    .word 0                             /* reserved */
    .word 104                           /* I/O map base: none */
    .balign 16
host_tss:
    .long 0
    .quad host_stack_top
    .skip 104 - 12
    .balign 16

    .bss
    .balign 4096
vmxon_region:   .skip 4096
vmcs_region:    .skip 4096
host_idt:       .skip 4096
guest_idt:      .skip 4096
guest_pml4:     .skip 4096
guest_pdpt:     .skip 4096
guest_pd:       .skip 4096
guest_pt:       .skip 4096
guest_pd_apic:  .skip 4096
ept_pml4:       .skip 4096
ept_pdpt:       .skip 4096
ept_pd:         .skip 4096
ept_pt:         .skip 4096
ept_pd_apic:    .skip 4096
