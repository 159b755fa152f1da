"""What the differential tests expect of each self-logging image (shared by the Bochs,
QEMU and idtlab tests)."""

from __future__ import annotations

from idtlab import diff as differ

# The tests each image runs, in order ("boot" checks the multiboot entry state).
TESTS = {
    "bp_stacks": ["boot", "bp_ist1", "bp_ist1_misaligned", "bp_current_stack_misaligned",
                  "bp_current_stack_aligned"],
    "db_breakpoint": ["boot", "db_code_breakpoint_pushes_rf_0"],
    "int_gates": ["boot", "int_dpl3_gate_from_cpl3", "int_dpl0_gate_from_cpl3"],
    "nmi_apic": ["boot", "nmi_latched_until_iret", "nmi_nested_after_bp_iret", "ipi_sti_shadow"],
    "np_df": ["boot", "np_int_through_not_present_gate",
              "np_exception_through_not_present_gate", "df_pf_while_delivering_pf"],
    "pf_codes": ["boot", "pf_read_not_present", "pf_write_not_present", "pf_write_read_only",
                 "pf_fetch_not_present", "pf_fetch_execute_disable",
                 "pf_user_read_supervisor_page"],
    "rf_frames": ["boot", "rf_gp_fault_frame", "rf_ud_fault_frame", "rf_pf_fault_frame",
                  "rf_int3_trap_frame", "rf_int_n_trap_frame"],
}
# The known QEMU divergences each image shows against Bochs (QEMU 7.2 TCG).
QEMU_DIVERGENCES = {
    "bp_stacks": set(),
    "db_breakpoint": set(),
    "int_gates": {"qemu-idt-error-code", "qemu-rf-fault-frames"},
    "nmi_apic": set(),
    "np_df": {"qemu-idt-error-code", "qemu-rf-fault-frames", "df-state-undefined"},
    "pf_codes": {"qemu-rf-fault-frames"},
    "rf_frames": {"qemu-rf-fault-frames"},
}


def verdicts(log: str) -> list[tuple[str, str]]:
    """(test, "PASS" or "FAIL <reason>") for every verdict record of a log."""
    return [(r.test, r.verdict if r.verdict == "PASS" else f"FAIL {r.reason}")
            for r in differ.parse_log(log) if r.kind == "verdict"]
