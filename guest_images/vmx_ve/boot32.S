/* Multiboot v1 header and 32-bit entry of the #VE image: build the hypervisor's identity
 * map (first 1 GiB, 2-MiB pages), enter long mode and jump to hyp_main (hyp.S).
 *
 * Entry state (Multiboot specification 0.6.96, "Machine state"): 32-bit protected mode,
 * flat CS/DS/ES/SS, paging off, interrupts off, EAX = 0x2BADB002, EBX = the multiboot
 * information (not used). The loader places the ELF's PT_LOAD segments (flags 0: no
 * a.out address fields); the entry zeroes .bss in case the loader did not.
 */
    .intel_syntax noprefix
    .include "vmx_ve.inc"

    .set MB_MAGIC, 0x1badb002
    .set MB_FLAGS, 0                 /* no requests; load the ELF segments */
    .set MB_BOOT_MAGIC, 0x2badb002   /* EAX at entry */

    .set CR0_PE, 1 << 0
    .set CR0_NE, 1 << 5
    .set CR0_WP, 1 << 16
    .set CR0_PG, 1 << 31
    .set CR4_PAE, 1 << 5
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 1 << 8
    .set PTE_P_RW, 0x3
    .set PDE_2M, 0x83               /* present, writable, 2-MiB page */

    .section .mbheader, "a"
    .balign 4
    .globl mb_header
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long (-(MB_MAGIC + MB_FLAGS)) & 0xffffffff

    .section .text32, "ax"
    .code32
    .globl mb_entry
mb_entry:
    cli
    cmp eax, MB_BOOT_MAGIC
    jne 9f
    cld
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    mov esp, offset boot_stack_top

    /* Identity map of the first GiB: PML4[0] -> PDPT, PDPT[0] -> PD, 512 2-MiB pages. */
    mov dword ptr [host_pml4], offset host_pdpt + PTE_P_RW
    mov dword ptr [host_pdpt], offset host_pd + PTE_P_RW
    xor ecx, ecx
1:  mov eax, ecx
    shl eax, 21
    or eax, PDE_2M
    mov [host_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 512
    jb 1b

    lgdt [hyp_gdt_ptr32]
    mov eax, cr4
    or eax, CR4_PAE
    mov cr4, eax
    mov eax, offset host_pml4
    mov cr3, eax
    mov ecx, MSR_EFER
    rdmsr
    or eax, EFER_LME
    wrmsr
    mov eax, cr0
    or eax, CR0_PG | CR0_WP | CR0_NE | CR0_PE
    mov cr0, eax
    /* far jump to the 64-bit code segment (emitted as bytes: ljmp ptr16:32) */
    .byte 0xea
    .long long_entry
    .word SEL_CODE
9:  hlt
    jmp 9b

    .text
    .code64
long_entry:
    mov ax, SEL_DATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov rsp, offset host_stack_top
    jmp hyp_main

    .bss
    .balign 4096
    .globl host_pml4, host_stack_top
host_pml4:  .skip 4096
host_pdpt:  .skip 4096
host_pd:    .skip 4096
boot_stack: .skip 4096
boot_stack_top:
host_stack: .skip 0x4000
host_stack_top:
