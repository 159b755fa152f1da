"""`idtlab suite`: reading a kvm-unit-tests unittests.cfg, deciding what runs where, and
reading how each side ended. No emulator runs here (see test_suite_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from idtlab import suite
from idtlab.errors import BadInput
from idtlab.suite import Spawned, Status


def write_cfg(tmp_path: Path, text: str, files: tuple[str, ...] = ("t.flat",)) -> Path:
    d = tmp_path / "x86"
    d.mkdir(exist_ok=True)
    for f in files:
        (d / f).write_bytes(b"\x7fELF")
    cfg = d / "unittests.cfg"
    cfg.write_text(text)
    return cfg


def one_plan(tmp_path: Path, text: str, only: list[str] | None = None,
             reference: str | None = "qemu") -> suite.Plan:
    cfg = write_cfg(tmp_path, text)
    plans = suite.plan(cfg, suite.parse_config(cfg), only, None, reference)
    assert len(plans) == 1
    return plans[0]


# ------------------------------------------------------------------------------ parsing

def test_a_section_gives_file_arguments_cpus_arch_groups_accel_and_timeout(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "# comment\n\n[vmexit_cpuid]\nfile = vmexit.flat\ntest_args = 'cpuid'\n"
                              "smp = 2\narch = x86_64\ngroups = vmexit  fast\naccel = tcg\n"
                              "timeout = 2m\nqemu_params = -cpu max,+x2apic -m 256\n"
                              "check = /sys/x=Y\n")
    [c] = suite.parse_config(cfg)
    assert c == suite.Config(name="vmexit_cpuid", line=3, file="vmexit.flat", test_args="cpuid",
                             qemu_params=("-cpu", "max,+x2apic", "-m", "256"), smp=2,
                             arch="x86_64", groups=("vmexit", "fast"), accel="tcg", timeout=120.0)


def test_extra_params_append_gives_the_arguments_and_the_rest_are_qemu_options(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[a]\nfile = t.flat\nextra_params = -cpu qemu64 -append 'one two'\n")
    [c] = suite.parse_config(cfg)
    assert (c.test_args, c.qemu_params) == ("one two", ("-cpu", "qemu64"))


def test_the_append_inside_the_parameters_wins_over_test_args_as_in_qemu(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[a]\nfile = t.flat\ntest_args = first\nqemu_params = -append second\n")
    assert suite.parse_config(cfg)[0].test_args == "second"


def test_triple_quoted_parameters_span_lines(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, '[a]\nfile = t.flat\nqemu_params = """-cpu max \\\n  -m 512\n'
                              '  -append "x y" """\n[b]\nfile = t.flat\n')
    a, b = suite.parse_config(cfg)
    assert (a.qemu_params, a.test_args) == (("-cpu", "max", "-m", "512"), "x y")
    assert b.name == "b"


def test_a_config_without_arguments_or_options_has_defaults(tmp_path: Path) -> None:
    [c] = suite.parse_config(write_cfg(tmp_path, "[a]\nfile = t.flat\n"))
    assert (c.test_args, c.qemu_params, c.smp, c.arch, c.groups, c.accel, c.timeout) == \
        ("", (), 1, "", (), "", None)


@pytest.mark.parametrize(("text", "message"), [
    ("[a]\nfile = t.flat\nthis is not a key\n", "unittests.cfg:3: not a section"),
    ("file = t.flat\n[a]\n", "unittests.cfg:1: `file =` before the first [section]"),
    ("[a]\ntest_args = x\n", "unittests.cfg:1: [a] has no `file =`"),
    ("[a]\nfile = t.flat\nsmp = two\n", "unittests.cfg:3: [a] smp = 'two': expected a CPU count"),
    ("[a]\nfile = t.flat\ntimeout = soon\n", "unittests.cfg:3: [a] timeout = 'soon'"),
    ("[a]\nfile = t.flat\n[a]\nfile = t.flat\n", "unittests.cfg:3: [a] appears twice"),
    ("[a]\nfile = t.flat\ntest_args = 'open\n", "unittests.cfg:3: [a] test_args: No closing quotation"),
    ("# only a comment\n", "no [config] sections"),
    ('[a]\nfile = t.flat\nqemu_params = """-cpu max\n', "qemu_params opens \"\"\" and never closes"),
    ("[]\n", "unittests.cfg:1: empty section name"),
])
def test_a_malformed_file_is_bad_input_naming_file_and_line(tmp_path: Path, text: str,
                                                              message: str) -> None:
    with pytest.raises(BadInput) as info:
        suite.parse_config(write_cfg(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"nope\.cfg: no such file"):
        suite.parse_config(tmp_path / "nope.cfg")


@pytest.mark.parametrize(("params", "mib"), [
    ((), 128), (("-m", "2048"), 2048), (("-m", "4g"), 4096), (("-m", "size=512M"), 512),
    (("-m", "1G,slots=2,maxmem=4G"), 1024), (("-m", "64", "-m", "96"), 96),
    (("-m", "131072k"), 128),
])
def test_memory_is_qemus_dash_m_else_its_default_of_128_mib(params: tuple[str, ...], mib: int) -> None:
    assert suite.memory_mib(params) == mib


@pytest.mark.parametrize(("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("2m", 120.0),
                                                ("1.5h", 5400.0), ("0", 0.0), (".5", 0.5)])
def test_durations_follow_the_syntax_of_timeout_1(text: str, seconds: float) -> None:
    assert suite.parse_duration(text, "timeout") == seconds


# ------------------------------------------------------------------------------ planning

@pytest.mark.parametrize(("section", "reason"), [
    ("arch = i386", "i386 only"),
    ("smp = 4", "needs 4 CPUs; idtlab models one; --only runs it on one"),
    ("groups = vmx nested_exception", "needs VMX (group vmx), which idtlab does not model"),
    ("qemu_params = -cpu max,+svm", "needs SVM (-cpu ...+svm), which idtlab does not model"),
    ("qemu_params = -cpu host,hv_passthrough", "needs Hyper-V (-cpu ...hv_), which idtlab does "
                                               "not model"),
    ("accel = kvm", "accel = kvm: KVM only"),
    ("groups = nodefault", "group nodefault: run only on request; --only runs it"),
])
def test_the_default_policy_skips_with_the_reason_on_both_sides(tmp_path: Path, section: str,
                                                                reason: str) -> None:
    p = one_plan(tmp_path, f"[a]\nfile = t.flat\n{section}\n")
    assert (p.idtlab_skip, p.reference_skip) == (reason, reason)


@pytest.mark.parametrize(("file", "reason"), [
    ("hyperv_clock.flat", "needs Hyper-V, which idtlab does not model"),
    ("asyncpf.flat", "tests KVM asynchronous page faults, a KVM paravirtual interface"),
    ("kvmclock_test.flat", "tests kvmclock, a KVM paravirtual interface"),
    ("vmware_backdoors.flat", "tests KVM's VMware backdoor, a KVM paravirtual interface"),
])
def test_tests_of_hyperv_and_kvm_interfaces_are_skipped_by_file(tmp_path: Path, file: str,
                                                                 reason: str) -> None:
    cfg = write_cfg(tmp_path, f"[a]\nfile = {file}\n", files=(file,))
    [p] = suite.plan(cfg, suite.parse_config(cfg), None, None, None)
    assert (p.idtlab_skip, p.reference_skip) == (reason, None)


def test_a_missing_kernel_is_skipped_saying_how_to_get_it(tmp_path: Path) -> None:
    p = one_plan(tmp_path, "[a]\nfile = gone.flat\n")
    assert p.idtlab_skip == (f"no file {tmp_path / 'x86/gone.flat'}; build kvm-unit-tests first "
                             "(docs/kvm-unit-tests.md)")


def test_only_runs_a_config_the_policy_skips_on_one_cpu(tmp_path: Path) -> None:
    p = one_plan(tmp_path, "[a]\nfile = t.flat\nsmp = 4\ngroups = nodefault\n", only=["a"])
    assert (p.idtlab_skip, p.reference_skip) == (None, None)
    assert p.qemu_argv()[p.qemu_argv().index("-smp") + 1] == "1"


def test_only_cannot_run_a_config_for_another_arch(tmp_path: Path) -> None:
    p = one_plan(tmp_path, "[a]\nfile = t.flat\narch = i386\n", only=["a"])
    assert p.idtlab_skip == "i386 only"


def test_only_takes_patterns_and_an_unmatched_one_is_bad_input(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[vmexit_a]\nfile = t.flat\n[vmexit_b]\nfile = t.flat\n[c]\nfile = t.flat\n")
    configs = suite.parse_config(cfg)
    assert [p.config.name for p in suite.plan(cfg, configs, ["vmexit_*"], None, None)] == \
        ["vmexit_a", "vmexit_b"]
    with pytest.raises(BadInput, match=r"--only nope: no config of .* matches \(there are 3: "
                                       r"vmexit_a, vmexit_b, c\)"):
        suite.plan(cfg, configs, ["nope"], None, None)


@pytest.mark.parametrize(("section", "reason"), [
    ("qemu_params = -cpu host", "-cpu host needs KVM; QEMU runs TCG here"),
    ("qemu_params = -enable-kvm -cpu max", "-enable-kvm; QEMU runs TCG here"),
])
def test_qemu_alone_is_skipped_where_tcg_cannot_run_the_config(tmp_path: Path, section: str,
                                                               reason: str) -> None:
    p = one_plan(tmp_path, f"[a]\nfile = t.flat\n{section}\n")
    assert (p.idtlab_skip, p.reference_skip) == (None, reason)


def test_ram_the_machine_cannot_have_is_an_idtlab_skip(tmp_path: Path) -> None:
    p = one_plan(tmp_path, "[a]\nfile = t.flat\nqemu_params = -m 4g\n")
    assert p.idtlab_skip == ("needs 4096 MiB of RAM; idtlab's RAM must end below the local APIC "
                             "at 0xfee00000")
    assert p.reference_skip is None


def test_both_sides_boot_the_kernel_as_kvm_unit_tests_names_it_with_the_same_ram(tmp_path: Path) -> None:
    # Quotes group words as the shell would: kvm-unit-tests evals `-append 'x  y'`.
    p = one_plan(tmp_path, "[a]\nfile = t.flat\ntest_args = 'x  y' z\nqemu_params = -cpu max -m 256\n")
    assert p.cmdline == "x86/t.flat x  y z"
    assert p.cwd == tmp_path.resolve()
    assert p.idtlab_argv(1000) == ["idtlab", "run", "--image", str((tmp_path / "x86/t.flat").resolve()),
                                   "--cmdline", "x86/t.flat x  y z", "--memory", "256M",
                                   "--max-insns", "1000"]
    assert p.idtlab_argv(1000, "host")[-2:] == ["--tsc", "host"]  # suite --tsc host
    # kvm-unit-tests' x86/run, then -smp, the config's own options, -kernel, -append.
    assert p.qemu_argv() == [
        "qemu-system-x86_64", "--no-reboot", "-nodefaults", "-global",
        "kvm-pit.lost_tick_policy=discard", "-device", "pc-testdev", "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
        "-device", "pci-testdev", "-machine", "accel=tcg", "-smp", "1", "-cpu", "max", "-m", "256",
        "-kernel", "x86/t.flat", "-append", "x  y z"]


def test_without_arguments_qemu_gets_no_append_and_the_command_line_ends_in_a_space(tmp_path: Path) -> None:
    # hw/i386/multiboot.c passes "FILE ARGS": the file name, a space, the (empty) -append.
    p = one_plan(tmp_path, "[a]\nfile = t.flat\n")
    assert p.cmdline == "x86/t.flat "
    assert "-append" not in p.qemu_argv()


def test_the_time_limit_is_the_configs_the_default_or_the_override(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "[a]\nfile = t.flat\ntimeout = 30\n[b]\nfile = t.flat\n"
                              "[c]\nfile = t.flat\ntimeout = 0\n")
    configs = suite.parse_config(cfg)
    assert [p.timeout for p in suite.plan(cfg, configs, None, None, None)] == [30.0, 90.0, None]
    assert [p.timeout for p in suite.plan(cfg, configs, None, 5.0, None)] == [5.0, 5.0, 5.0]


# ------------------------------------------------------------------------------ verdicts

def spawned(out: str = "", err: str = "", status: int | None = 0, timed_out: bool = False,
            over_rss: bool = False) -> Spawned:
    return Spawned(out, err, status, timed_out, over_rss, 1.0)


@pytest.fixture
def a_plan(tmp_path: Path) -> suite.Plan:
    return one_plan(tmp_path, "[a]\nfile = t.flat\ntimeout = 7\n")


@pytest.mark.parametrize(("status", "log", "err", "expected"), [
    (1, "PASS: x\nSUMMARY: 1 tests\n", "", (Status.PASS, "exit 0", 0)),
    (1, "PASS: x\nSUMMARY: 1 tests\n", "qemu: warning: TCG doesn't support requested feature\n",
     (Status.PASS, "exit 0", 0)),
    (3, "FAIL: x\nSUMMARY: 1 tests, 1 unexpected failures\n", "", (Status.FAIL, "exit 1", 1)),
    (77, "SKIP: x\nSUMMARY: 1 tests, 1 skipped\n", "", (Status.SKIP, "exit 38", 38)),
    (1, "FAIL: hidden\n", "", (Status.FAIL, "exit 0", 0)),
    (1, "XPASS: x\n", "", (Status.FAIL, "exit 0", 0)),
    (0, "", "", (Status.FAIL, "no exit", None)),
    (1, "", "qemu-system-x86_64: CPU model 'host' requires KVM or HVF\n", (Status.ERROR, "error", None)),
    (-9, "", "", (Status.ERROR, "error", None)),
])
def test_qemus_exit_status_is_the_code_shifted_left_with_bit_0_set(
        a_plan: suite.Plan, status: int, log: str, err: str,
        expected: tuple[Status, str, int | None]) -> None:
    r = suite.interpret_qemu(spawned(log, err, status), a_plan)
    assert (r.status, r.how, r.exit_code) == expected


def test_qemu_failing_to_start_names_its_error(a_plan: suite.Plan) -> None:
    r = suite.interpret_qemu(spawned("", "qemu-system-x86_64: CPU model 'host' requires KVM or HVF\n",
                                     1), a_plan)
    assert r.stop == "QEMU failed: qemu-system-x86_64: CPU model 'host' requires KVM or HVF"


def test_a_timeout_names_the_limit_and_the_last_line(a_plan: suite.Plan) -> None:
    r = suite.interpret_qemu(spawned("one\ntwo\n", "", None, timed_out=True), a_plan)
    assert (r.status, r.how, r.stop) == (Status.TIMEOUT, "after 7 s",
                                         "no end within 7 s; last line: two")


END = "idtlab: t.flat: {} at {}; 3234 instructions, 3898 cycles (fast mode), 1 events delivered"


def test_idtlabs_summary_line_gives_the_exit_code_and_is_not_part_of_the_log(a_plan: suite.Plan) -> None:
    out = "PASS: a\nSUMMARY: 1 tests\n" + END.format("exit (exit device: 0x0)", "exit+0x2") + "\n"
    r = suite.interpret_idtlab(spawned(out, status=0), None, a_plan)
    assert (r.status, r.how, r.stop, r.exit_code, r.summary, r.log) == (
        Status.PASS, "exit 0", "exit 0", 0, "1 tests", "PASS: a\nSUMMARY: 1 tests\n")


def test_an_idtlab_stop_before_the_exit_is_a_fail_naming_outcome_reason_and_place(
        a_plan: suite.Plan) -> None:
    reason = ("local APIC access by 'movabs eax, dword ptr [0xfee00020]' at 0x406143: only MOV "
              "between a register or immediate and a 32-bit APIC register is emulated")
    out = "enabling apic\n" + END.format(f"unsupported ({reason})", "xapic_id+0x4") + "\n"
    r = suite.interpret_idtlab(spawned(out, status=1), None, a_plan)
    assert (r.status, r.how, r.stop) == (Status.FAIL, "unsupported",
                                         f"unsupported ({reason}) at xapic_id+0x4")


def test_a_fail_line_makes_exit_0_a_fail_and_the_stop_quotes_the_first(a_plan: suite.Plan) -> None:
    out = ("FAIL: one\nFAIL: two\n" + END.format("exit (exit device: 0x0)", "exit+0x2") + "\n")
    r = suite.interpret_idtlab(spawned(out, status=0), None, a_plan)
    assert (r.status, r.stop, r.fail_lines) == (
        Status.FAIL, "exit 0; first of 2 FAIL lines: FAIL: one", ("FAIL: one", "FAIL: two"))


def test_an_idtlab_traceback_is_an_error_whose_stop_is_the_exception(a_plan: suite.Plan) -> None:
    err = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nKeyError: 'sil'\n"
    r = suite.interpret_idtlab(spawned("", err, 1), None, a_plan)
    assert (r.status, r.how, r.stop) == (Status.ERROR, "crash", "Python traceback: KeyError: 'sil'")


def test_an_idtlab_bad_input_is_an_error_with_its_message(a_plan: suite.Plan) -> None:
    r = suite.interpret_idtlab(spawned("", "idtlab: error: x.flat: not an ELF file\n", 2), None, a_plan)
    assert (r.status, r.stop) == (Status.ERROR, "x.flat: not an ELF file")


def test_a_run_over_the_memory_limit_is_an_error(a_plan: suite.Plan) -> None:
    r = suite.interpret_idtlab(spawned("", "", None, over_rss=True), 4096, a_plan)
    assert (r.status, r.how) == (Status.ERROR, "over --max-rss")
    assert r.stop.startswith("resident memory above 4096 MiB after ")


def test_the_fail_lines_that_differ_are_a_difference_of_multisets(a_plan: suite.Plan) -> None:
    ours = suite.SideResult(Status.FAIL, "exit 1", "exit 1", fail_lines=("FAIL: a", "FAIL: b", "FAIL: b"))
    theirs = suite.SideResult(Status.FAIL, "exit 1", "exit 1", fail_lines=("FAIL: b", "FAIL: c"))
    assert suite.Row(a_plan, ours, theirs).differing == (["FAIL: a", "FAIL: b"], ["FAIL: c"])
    assert suite.Row(a_plan, ours, None).differing == (["FAIL: a", "FAIL: b", "FAIL: b"], [])


def test_an_abnormal_exit_names_the_unhandled_exception_that_ended_it(a_plan: suite.Plan) -> None:
    log = ("PASS: push16\nFAIL: non-canonical rsp-based access, should #SS(0), got #GP(0)\n"
           "Unhandled exception 13 #GP(0) at ip aaaaaaaaaaaaaaaa\nrax=0\n\tSTACK: @aaaa\n")
    r = suite.interpret_qemu(spawned(log, "", (63 << 1) | 1), a_plan)
    assert (r.status, r.how, r.stop) == (
        Status.FAIL, "exit 63", "exit 63; Unhandled exception 13 #GP(0) at ip aaaaaaaaaaaaaaaa; "
                                "first of 1 FAIL lines: FAIL: non-canonical rsp-based access, should "
                                "#SS(0), got #GP(0)")


def test_a_failed_assertion_is_named_in_the_stop(a_plan: suite.Plan) -> None:
    log = ("enabling apic\nx86/apic.c:942: assert failed: is_apic_hw_enabled(): APIC should be "
           "fully enabled by startup code.\n\tSTACK: 401fb1 4001ad\n")
    r = suite.interpret_qemu(spawned(log, "", 127), a_plan)
    assert r.stop == ("exit 63; x86/apic.c:942: assert failed: is_apic_hw_enabled(): APIC should be "
                      "fully enabled by startup code.")


def test_a_reset_after_fail_lines_names_the_first_of_them(a_plan: suite.Plan) -> None:
    r = suite.interpret_qemu(spawned("PASS: a\nFAIL: Expected #GP\nPASS: b\n", "", 0), a_plan)
    assert (r.how, r.stop) == ("no exit", "QEMU exited with status 0: the kernel did not exit "
                                          "through the test device (a triple fault or a reset, under "
                                          "-no-reboot); first of 1 FAIL lines: FAIL: Expected #GP")


def test_the_tsc_is_the_host_clock_only_for_the_vmexit_benchmarks_unless_chosen(
        tmp_path: Path) -> None:
    bench = one_plan(tmp_path, "[v]\nfile = vmexit.flat\ntest_args = 'cpuid'\ngroups = vmexit\n")
    other = one_plan(tmp_path, "[e]\nfile = eventinj.flat\n")
    assert suite.tsc_for(bench.config, "auto") == "host"
    assert suite.tsc_for(other.config, "auto") == "cycles"
    assert suite.tsc_for(bench.config, "cycles") == "cycles"
    assert suite.tsc_for(other.config, "host") == "host"
