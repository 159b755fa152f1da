"""What the differential tests expect of each self-logging image (shared by the Bochs,
QEMU and idtlab tests).

The SDM-corner images (docs/sdm-map.md, "SDM corners real handlers hit", `SDM_IMAGES`)
are compared test
by test with Bochs' log, recorded in `tests/differential/bochs/<image>.log`:
`python -m tests.differential.expected --record` rewrites those files from Bochs (do it
only when an image changes, and say why in the commit). `IDTLAB_PENDING` lists the
tests whose records idtlab does not reproduce yet, each with the number of the rule in docs/sdm-map.md's SDM-corner table
that fixes it; `QEMU_SDM_DIVERGENCES` the ones QEMU 7.2 TCG gets wrong, each with why."""

from __future__ import annotations

import sys
from pathlib import Path

from idtlab import diff as differ
from idtlab import ref

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
    # SDM corners (docs/sdm-map.md)
    "ac_lock_rmw": ["boot", "ac_unaligned_load_at_cpl3", "ac_unaligned_push_at_cpl3",
                    "ac_not_at_cpl0", "ac_needs_cr0_am", "ac_needs_rflags_ac", "lock_mov_is_ud",
                    "lock_register_destination_is_ud", "lock_cmp_is_ud", "lock_add_memory_runs",
                    "rmw_add_not_present_is_write", "rmw_inc_not_present_is_write",
                    "rmw_xchg_not_present_is_write", "rmw_cmpxchg_not_present_is_write",
                    "rmw_lock_add_not_present_is_write", "rmw_add_read_only_is_write",
                    "cmp_not_present_is_read"],
    "canon_branch": ["boot", "jmp_rel32_noncanonical", "jcc_rel32_noncanonical",
                     "jcc_not_taken_noncanonical", "loop_rel8_noncanonical",
                     "call_rel32_noncanonical", "jmp_reg_noncanonical", "jmp_mem_noncanonical",
                     "call_reg_noncanonical", "call_mem_noncanonical", "ret_noncanonical",
                     "ret_imm_noncanonical", "straddle_load_gp", "straddle_store_gp",
                     "straddle_push_ss"],
    "debug_regs": ["boot", "dr1_instruction_breakpoint_fault", "dr0_write_breakpoint_trap",
                   "dr0_write_breakpoint_ignores_reads", "dr2_read_write_breakpoint_on_a_read",
                   "dr3_two_byte_range_overlap", "dr2_io_breakpoint_with_cr4_de",
                   "rf_from_iretq_suppresses_breakpoint",
                   "single_step_and_data_breakpoint_together", "dr6_bs_is_sticky",
                   "dr7_gd_faults_the_next_mov_dr", "mov_ss_delays_a_data_breakpoint"],
    "io_perm": ["boot", "io_no_bitmap_is_gp", "io_iopl3_skips_the_bitmap", "io_allowed_port",
                "io_denied_port_is_gp", "io_word_with_one_denied_byte_is_gp",
                "io_word_both_allowed", "io_port_beyond_the_limit_is_gp",
                "io_last_byte_within_the_limit", "io_second_bitmap_byte_beyond_the_limit_is_gp",
                "io_ins_denied_port_is_gp"],
    "iret_rules": ["boot", "iret_to_cpl3_nulls_dpl0_segments",
                   "iret_to_cpl3_keeps_conforming_code", "iret_same_cpl_keeps_segments",
                   "iret_with_nt_is_gp", "iret_loads_nt_from_frame"],
    "shadow_chain": ["boot", "ipi_mov_ss_after_sti", "ipi_sti_after_mov_ss", "ipi_sti_after_sti",
                     "tf_mov_ss_after_mov_ss", "tf_sti_after_mov_ss"],
    "ss_gp_segment": ["boot", "push_mem_rbx_gp", "pop_mem_rbx_gp", "call_mem_rbx_gp",
                      "push_mem_rbp_ss", "mov_rbp_base_ss", "mov_rsp_base_ss", "mov_rbp_index_gp",
                      "mov_ss_override_rbx_gp", "mov_ds_override_rbp_ss", "mov_fs_override_rbp_gp",
                      "mov_gs_override_rsp_gp", "push_noncanonical_rsp_ss"],
    "step_emulated": ["boot", "tf_over_iretq", "tf_loaded_by_iretq", "tf_over_rdmsr",
                      "tf_over_wrmsr", "tf_over_cpuid", "tf_over_out", "tf_over_in",
                      "tf_over_apic_read", "tf_over_hlt_wake", "tf_over_mov_ss"],
    "store_fault": ["boot", "store_into_not_present_leaves_first_page",
                    "store_into_read_only_leaves_first_page",
                    "push_into_not_present_leaves_first_page",
                    "rep_stosb_keeps_completed_iterations"],
}
SDM_IMAGES = ("ac_lock_rmw", "canon_branch", "debug_regs", "io_perm", "iret_rules",
              "shadow_chain", "ss_gp_segment", "step_emulated", "store_fault")
# The images compared with Bochs as a whole (idtlab must pass all of their verdicts).
CLASSIC_IMAGES = tuple(sorted(set(TESTS) - set(SDM_IMAGES)))
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


# The tests of SDM_IMAGES whose records idtlab does not reproduce yet, each with the rule of
# docs/sdm-map.md that fixes it (strict xfail: a test flips to a failure the day its wiring
# lands, and then leaves this table). Every SDM-corner rule is wired: none is pending.
IDTLAB_PENDING: dict[str, dict[str, str]] = {image: {} for image in SDM_IMAGES}

# The tests of SDM_IMAGES where QEMU 7.2 TCG differs from Bochs beyond its listed
# KNOWN_DIVERGENCES (RF in fault frames), and why (each is QEMU against the SDM, except
# where the SDM allows both outcomes).
_Q1 = "QEMU jumps first: #GP at the non-canonical RIP (and a CALL has pushed, a RET popped)"
QEMU_SDM_DIVERGENCES: dict[str, dict[str, str]] = {
    "ac_lock_rmw": {
        "ac_unaligned_load_at_cpl3": "no alignment checking in TCG",
        "ac_unaligned_push_at_cpl3": "no alignment checking in TCG",
        "lock_mov_is_ud": "LOCK MOV runs",
        **{t: "#PF error code W = 0 for a read-modify-write" for t in (
            "rmw_add_not_present_is_write", "rmw_inc_not_present_is_write",
            "rmw_xchg_not_present_is_write", "rmw_cmpxchg_not_present_is_write",
            "rmw_lock_add_not_present_is_write")},
    },
    "canon_branch": {
        **{t: _Q1 for t in ("jmp_rel32_noncanonical", "jcc_rel32_noncanonical",
                            "loop_rel8_noncanonical", "call_rel32_noncanonical",
                            "jmp_reg_noncanonical", "jmp_mem_noncanonical",
                            "call_reg_noncanonical", "call_mem_noncanonical",
                            "ret_noncanonical", "ret_imm_noncanonical")},
        **{t: "#PF on the last canonical page instead of #GP/#SS" for t in (
            "straddle_load_gp", "straddle_store_gp", "straddle_push_ss")},
    },
    "debug_regs": {
        "single_step_and_data_breakpoint_together": "two #DBs (B0, then BS) for one instruction",
        "dr7_gd_faults_the_next_mov_dr": "DR7.GD is not implemented",
        "mov_ss_delays_a_data_breakpoint": "the data breakpoint hit by MOV SS is not held",
    },
    "io_perm": {},
    "iret_rules": {},
    "shadow_chain": {
        "ipi_mov_ss_after_sti": "only the first shadow of a chain (allowed by the SDM)",
        "ipi_sti_after_mov_ss": "only the first shadow of a chain (allowed by the SDM)",
        "tf_mov_ss_after_mov_ss": "the second MOV SS suppresses the trap again (allowed)",
        "tf_sti_after_mov_ss": "the single-step trap after STI is held",
    },
    "ss_gp_segment": {t: "#GP for every non-canonical access, #SS never" for t in (
        "push_mem_rbp_ss", "mov_rbp_base_ss", "mov_rsp_base_ss", "mov_ds_override_rbp_ss",
        "push_noncanonical_rsp_ss")},
    "step_emulated": {"tf_over_hlt_wake": "the timer interrupt is taken before the HLT's #DB"},
    "store_fault": {},
}

BOCHS_DIR = Path(__file__).resolve().parent / "bochs"


def recorded_bochs_log(image: str) -> str:
    """The Bochs log of an SDM image as recorded (tests/differential/bochs/<image>.log)."""
    return (BOCHS_DIR / f"{image}.log").read_text()


def records_of(log: str, test: str) -> list[str]:
    """The text of every record of `test` in a log, in order."""
    return [r.text for r in differ.parse_log(log) if r.test == test and r.kind != "begin"]


def record_bochs_logs() -> None:
    """Run every SDM image on Bochs and write its log to tests/differential/bochs/."""
    BOCHS_DIR.mkdir(exist_ok=True)
    for image in SDM_IMAGES:
        run = ref.run_reference("bochs", image, 60.0)
        if run.verdict() != (len(TESTS[image]), 0):
            sys.exit(f"{image}: Bochs did not pass every test: {run.status_line()}")
        (BOCHS_DIR / f"{image}.log").write_text(run.log)
        print(image)


def verdicts(log: str) -> list[tuple[str, str]]:
    """(test, "PASS" or "FAIL <reason>") for every verdict record of a log."""
    return [(r.test, r.verdict if r.verdict == "PASS" else f"FAIL {r.reason}")
            for r in differ.parse_log(log) if r.kind == "verdict"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python -m tests.differential.expected --record")
    record_bochs_logs()
