"""The cycle model's cost profile (cpu/timing.py, cpu/profiles/default.toml): instruction
classes, the default profile's completeness and sources, profile-file errors, user profiles.

No Unicorn: instructions are written as literal bytes and classified with Capstone only.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from cpu.timing import (
    EVENTS,
    INSTRUCTION_CLASSES,
    PROFILE_DIR,
    CostModel,
    Profile,
    ProfileError,
    classify,
    load_profile,
)

ADDR = 0x40_1000

# (bytes, what they are, expected class)
CLASSIFIED = [
    (b"\x90", "nop", "nop"),
    (b"\x0f\x1f\x00", "nop dword [rax]", "nop"),
    (b"\xf3\x0f\x1e\xfa", "endbr64", "nop"),
    (b"\x48\x01\xd8", "add rax, rbx", "alu"),
    (b"\x48\x89\xd8", "mov rax, rbx", "alu"),
    (b"\x48\xc7\xc0\x01\x00\x00\x00", "mov rax, 1", "alu"),
    (b"\x48\x8d\x03", "lea rax, [rbx]", "alu"),
    (b"\x48\x85\xc0", "test rax, rax", "alu"),
    (b"\x48\x99", "cqo", "alu"),
    (b"\x48\x8b\x03", "mov rax, [rbx]", "load"),
    (b"\x48\x03\x03", "add rax, [rbx]", "load"),
    (b"\x48\x39\x03", "cmp [rbx], rax", "load"),
    (b"\x0f\xb6\x03", "movzx eax, byte [rbx]", "load"),
    (b"\x58", "pop rax", "load"),
    (b"\x48\x89\x03", "mov [rbx], rax", "store"),
    (b"\x48\x01\x03", "add [rbx], rax", "store"),
    (b"\x50", "push rax", "store"),
    (b"\xf0\x48\x0f\xb1\x0b", "lock cmpxchg [rbx], rcx", "atomic"),
    (b"\xf0\x48\x01\x03", "lock add [rbx], rax", "atomic"),
    (b"\x48\x87\x03", "xchg [rbx], rax", "atomic"),
    (b"\x0f\xae\xf0", "mfence", "fence"),
    (b"\x0f\xae\xe8", "lfence", "fence"),
    (b"\xeb\x00", "jmp short", "branch"),
    (b"\x74\x00", "je short", "branch"),
    (b"\xe8\x00\x00\x00\x00", "call rel32", "branch"),
    (b"\xc3", "ret", "branch"),
    (b"\xff\xe0", "jmp rax", "branch"),
    (b"\xff\x13", "call [rbx]", "branch"),
    (b"\x48\x0f\xaf\xc3", "imul rax, rbx", "mul"),
    (b"\x48\xf7\xe3", "mul rbx", "mul"),
    (b"\x48\xf7\xf1", "div rcx", "div"),
    (b"\x48\xf7\x3b", "idiv qword [rbx]", "div"),
    (b"\xf3\x48\xa5", "rep movsq", "string"),
    (b"\xf3\xaa", "rep stosb", "string"),
    (b"\xa5", "movsd (string)", "string"),
    (b"\x0f\xa2", "cpuid", "serializing"),
    (b"\x0f\x09", "wbinvd", "serializing"),
    (b"\x0f\x01\x18", "lidt [rax]", "serializing"),
    (b"\x0f\x01\x38", "invlpg [rax]", "serializing"),
    (b"\x0f\x30", "wrmsr", "msr"),
    (b"\x0f\x32", "rdmsr", "msr"),
    (b"\x0f\x20\xd8", "mov rax, cr3", "cr"),
    (b"\x0f\x22\xd8", "mov cr3, rax", "cr"),
    (b"\x0f\x23\xc0", "mov dr0, rax", "cr"),
    (b"\xe6\x80", "out 0x80, al", "io"),
    (b"\xec", "in al, dx", "io"),
    (b"\xf3\x6e", "rep outsb", "io"),
    (b"\xfb", "sti", "interrupt_control"),
    (b"\xfa", "cli", "interrupt_control"),
    (b"\x9c", "pushfq", "interrupt_control"),
    (b"\x9d", "popfq", "interrupt_control"),
    (b"\xcf", "iretd", "event_instruction"),
    (b"\x48\xcf", "iretq", "event_instruction"),
    (b"\xcd\x80", "int 0x80", "event_instruction"),
    (b"\xcc", "int3", "event_instruction"),
    (b"\xf1", "int1", "event_instruction"),
    (b"\xf4", "hlt", "event_instruction"),
    (b"\x0f\x05", "syscall", "event_instruction"),
    (b"\x48\x0f\x07", "sysretq", "event_instruction"),
    (b"\x0f\x0b", "ud2", "event_instruction"),
    (b"\x0f\x58\xc1", "addps xmm0, xmm1", "fp_simd"),
    (b"\xf2\x0f\x10\xc1", "movsd xmm0, xmm1 (SSE2, not the string one)", "fp_simd"),
    (b"\xc5\xf4\x58\xc2", "vaddps ymm0, ymm1, ymm2", "fp_simd"),
    (b"\xd9\x03", "fld dword [rbx]", "fp_simd"),
    (b"\xf3\x90", "pause", "pause"),
    (b"\x0f\x01\xf8", "swapgs", "system"),
    (b"\x0f\x31", "rdtsc", "system"),
    (b"\x0f\x01\xca", "clac", "system"),
    (b"", "nothing", "other"),
    (b"\xce", "into (invalid in 64-bit mode)", "other"),
    (b"\x0f", "truncated", "other"),
]


def default_text() -> str:
    return (PROFILE_DIR / "default.toml").read_text()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- classification ------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "expected"), [(c, e) for c, _, e in CLASSIFIED],
                         ids=[text for _, text, _ in CLASSIFIED])
def test_each_encoded_instruction_falls_in_its_class(code: bytes, expected: str) -> None:
    assert classify(code, ADDR) == expected


def test_only_the_first_instruction_in_the_code_is_classified() -> None:
    assert classify(b"\x0f\xa2" + b"\x90" * 20, ADDR) == "serializing"
    assert classify(b"\x90\x0f\xa2", ADDR) == "nop"


def test_the_class_does_not_depend_on_the_address() -> None:
    for code, _, expected in CLASSIFIED:
        assert classify(code, 0) == classify(code, 0xFFFF_8000_0000_0000) == expected


def test_every_expected_class_in_this_file_is_a_declared_instruction_class() -> None:
    assert {expected for _, _, expected in CLASSIFIED} <= set(INSTRUCTION_CLASSES)


def test_every_declared_instruction_class_is_exercised_by_a_classification_case() -> None:
    assert set(INSTRUCTION_CLASSES) <= {expected for _, _, expected in CLASSIFIED}


# -- the default profile -------------------------------------------------------------------

def test_the_default_profile_costs_every_instruction_class_and_nothing_else() -> None:
    profile = load_profile()
    assert set(profile.instructions) == set(INSTRUCTION_CLASSES)


def test_the_default_profile_costs_every_event_the_machine_charges() -> None:
    profile = load_profile("default")
    required = {"deliver_same_cpl", "deliver_cpl_change", "nmi_extra", "iret_same_cpl",
                "iret_to_user", "hlt_wake", "apic_access", "ve_extra", "fetch_decode_penalty"}
    assert required <= set(EVENTS)
    assert set(profile.events) == set(EVENTS)
    for name in required:
        assert isinstance(profile.event(name), int) and profile.event(name) >= 0


def test_every_default_entry_has_a_non_empty_source() -> None:
    profile = load_profile()
    for name, entry in [*profile.instructions.items(), *profile.events.items()]:
        assert entry.source.strip(), name
    raw = tomllib.loads(default_text())
    assert raw["fast"]["source"].strip()


def test_the_default_profile_carries_the_public_event_figures_with_their_sources() -> None:
    profile = load_profile()
    assert profile.event("deliver_cpl_change") == 500
    assert "linux-xperf" in profile.events["deliver_cpl_change"].source
    assert profile.event("iret_to_user") == 290
    assert profile.instructions["event_instruction"].cost == 1
    assert profile.cycles_per_instruction == 1
    assert profile.frequency_mhz == 2400


def test_an_unknown_event_raises_a_profile_error_naming_it_and_the_known_events() -> None:
    profile = load_profile()
    with pytest.raises(ProfileError) as err:
        profile.event("deliver_sideways")
    message = str(err.value)
    assert "deliver_sideways" in message
    assert "deliver_cpl_change" in message and "iret_to_user" in message


def test_the_loaded_profile_cannot_be_modified() -> None:
    profile = load_profile()
    with pytest.raises(TypeError):
        profile.events["nmi_extra"] = profile.events["ve_extra"]  # type: ignore[index]


# -- bad profile files ---------------------------------------------------------------------

@pytest.mark.parametrize(("edit", "key"), [
    (lambda t: t + '\n[timing]\nx = 1\n', "timing"),
    (lambda t: t.replace("[instructions]\n", '[instructions]\nwarp = { cost = 1, source = "x" }\n'),
     "instructions.warp"),
    (lambda t: t.replace("alu = { cost = 1,", "alu = { cost = -1,"), "instructions.alu.cost"),
    (lambda t: t.replace("alu = { cost = 1,", 'alu = { cost = "1",'), "instructions.alu.cost"),
    (lambda t: t.replace("alu = { cost = 1,", "alu = { cost = true,"), "instructions.alu.cost"),
    (lambda t: t.replace("alu = { cost = 1,", "alu = {"), "instructions.alu"),
    (lambda t: t.replace("alu = { cost = 1,", "alu = { cost = 1, cots = 2,"), "instructions.alu.cots"),
    (lambda t: t.replace('alu = { cost = 1, source = "', 'alu = { cost = 1, source = " "} #'),
     "instructions.alu.source"),
    (lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("ve_extra")),
     "ve_extra"),
    (lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("nop ")), "nop"),
    (lambda t: t.replace("frequency_mhz = 2400", "frequency_mhz = 0"), "profile.frequency_mhz"),
    (lambda t: t.replace("cycles_per_instruction = 1", "cycles_per_instruction = 1.5"),
     "fast.cycles_per_instruction"),
    (lambda t: t.replace('name = "default"', 'name = "default"\ncolour = "blue"'), "profile.colour"),
    (lambda t: t.split("\n[events]\n")[0], "events"),
], ids=["unknown section", "unknown instruction class", "negative cost", "cost as a string",
        "cost as a boolean", "missing cost", "unknown entry key", "blank source", "missing event",
        "missing instruction class", "zero frequency", "fractional cycles per instruction",
        "unknown profile key", "missing events section"])
def test_a_bad_profile_file_raises_a_one_line_error_naming_the_file_and_the_key(
        tmp_path: Path, edit: Callable[[str], str], key: str) -> None:
    path = write(tmp_path, "bad.toml", edit(default_text()))
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert "bad.toml" in message
    assert key in message
    assert "\n" not in message


def test_a_file_that_is_not_toml_raises_a_profile_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.toml", "[profile\nname = 1\n")
    with pytest.raises(ProfileError, match=r"broken\.toml: invalid TOML"):
        load_profile(path)


def test_a_missing_file_raises_a_profile_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"absent\.toml"):
        load_profile(tmp_path / "absent.toml")


def test_an_unknown_built_in_profile_name_raises_a_profile_error_listing_the_built_ins() -> None:
    with pytest.raises(ProfileError, match=r"'icelake'.*default"):
        load_profile("icelake")


def test_a_profile_error_is_a_value_error() -> None:
    assert issubclass(ProfileError, ValueError)


# -- user profiles -------------------------------------------------------------------------

def test_a_complete_user_profile_file_overrides_a_cost(tmp_path: Path) -> None:
    text = default_text().replace('name = "default"', 'name = "mine"').replace(
        'deliver_cpl_change = { cost = 500, source = "',
        'deliver_cpl_change = { cost = 612, source = "measured; was: ')
    path = write(tmp_path, "mine.toml", text)
    for source in (path, str(path)):
        profile = load_profile(source)
        assert profile.name == "mine"
        assert profile.event("deliver_cpl_change") == 612
        assert profile.events["deliver_cpl_change"].source.startswith("measured")
        assert profile.event("iret_to_user") == load_profile().event("iret_to_user")


def test_a_user_profile_based_on_default_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = write(tmp_path, "my-box.toml", """
[profile]
base = "default"
[instructions]
div = { cost = 26, source = "measured: DIV r32 on my box" }
[events]
nmi_extra = { cost = 80, source = "measured: NMI vs #PF delivery, median of 1e6" }
""")
    default = load_profile()
    profile = load_profile(path)
    assert profile.name == "my-box"  # named after its file, not "default"
    assert profile.instructions["div"].cost == 26
    assert profile.event("nmi_extra") == 80
    assert profile.frequency_mhz == default.frequency_mhz
    assert profile.cycles_per_instruction == default.cycles_per_instruction
    assert {k: v for k, v in profile.instructions.items() if k != "div"} == \
        {k: v for k, v in default.instructions.items() if k != "div"}


def test_an_override_without_a_source_is_rejected_even_on_a_base(tmp_path: Path) -> None:
    path = write(tmp_path, "lazy.toml", '[profile]\nbase = "default"\n[events]\nhlt_wake = { cost = 10 }\n')
    with pytest.raises(ProfileError, match=r"lazy\.toml: events\.hlt_wake: missing 'source'"):
        load_profile(path)


def test_a_base_that_is_not_a_built_in_profile_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "orphan.toml", '[profile]\nbase = "skylake-x"\n')
    with pytest.raises(ProfileError, match=r"orphan\.toml: profile\.base: .*'skylake-x'"):
        load_profile(path)


# -- the cost model ------------------------------------------------------------------------

def test_the_cost_model_charges_each_instruction_its_class_cost() -> None:
    profile = load_profile()
    model = CostModel(profile)
    for code, _, expected in CLASSIFIED:
        assert model.instruction_cost(code, ADDR) == profile.instructions[expected].cost


def test_the_cost_model_cache_gives_the_same_costs_on_every_call_and_at_any_address() -> None:
    model = CostModel(load_profile())
    first = [model.instruction_cost(code, ADDR) for code, _, _ in CLASSIFIED]
    again = [model.instruction_cost(code, ADDR + 0x1000) for code, _, _ in CLASSIFIED]
    assert first == again
    assert model.instruction_cost(b"\x48\xf7\xf1", 0) == model.instruction_cost(b"\x48\xf7\xf1", 8)


def test_the_cost_model_cache_tells_apart_instructions_that_share_a_prefix() -> None:
    profile = load_profile()
    model = CostModel(profile)
    assert model.instruction_cost(b"\x48\x01\xd8", ADDR) == profile.instructions["alu"].cost
    assert model.instruction_cost(b"\x48\x01\x03", ADDR) == profile.instructions["store"].cost
    assert model.instruction_cost(b"\x48\x01\xd8", ADDR) == profile.instructions["alu"].cost


def test_the_cost_model_uses_the_profile_it_was_given(tmp_path: Path) -> None:
    path = write(tmp_path, "slow-div.toml",
                 '[profile]\nbase = "default"\n[instructions]\ndiv = { cost = 90, source = "test" }\n')
    assert CostModel(load_profile(path)).instruction_cost(b"\x48\xf7\xf1", ADDR) == 90
    assert CostModel(load_profile()).instruction_cost(b"\x48\xf7\xf1", ADDR) == 40


def test_a_profile_is_a_plain_frozen_value() -> None:
    profile = load_profile()
    assert isinstance(profile, Profile)
    with pytest.raises(AttributeError):
        profile.name = "other"  # type: ignore[misc]


def test_a_profile_loaded_again_is_the_same_object_until_its_file_changes(tmp_path: Path) -> None:
    assert load_profile() is load_profile("default")  # immutable: shared by machines
    text = default_text().replace('name = "default"', 'name = "mine"')
    path = write(tmp_path, "mine.toml", text)
    first = load_profile(path)
    assert load_profile(path) is first
    write(tmp_path, "mine.toml", text.replace(
        'deliver_cpl_change = { cost = 500, source = "',
        'deliver_cpl_change = { cost = 6120, source = "measured; was: '))
    again = load_profile(path)
    assert again is not first and again.event("deliver_cpl_change") == 6120
    assert first.event("deliver_cpl_change") == 500
