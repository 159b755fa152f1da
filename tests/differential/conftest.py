"""Session fixtures for the differential tests: every self-logging image in
guest_images/mb/ is built once, and run once per reference (Bochs, QEMU) and once on
idtlab per test session; the logs are cached here.

Tests that need a reference are skipped with the reason (and the apt-get line) when it
is not installed; tests that need idtlab's multiboot support are skipped with the name
of the missing feature while it is not there."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from guest_images import build as gib
from idtlab import ref

IMAGES = gib.mb_image_names()
# A run takes well under a second on either reference; this only stops a hung image.
REF_TIMEOUT = 60.0
# Why differential tests were skipped: printed at the end of the run, so that a missing
# reference is never silent (pytest -q alone only shows an "s").
SKIP_REASONS: set[str] = set()


def _skip(reason: str) -> None:
    SKIP_REASONS.add(reason)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for reason in sorted(SKIP_REASONS):
        terminalreporter.write_line(f"differential tests skipped: {reason}", yellow=True)


@pytest.fixture(scope="session")
def built_images() -> dict[str, gib.MultibootImage]:
    return {name: gib.build_mb_image(name) for name in IMAGES}


def _reference_logs(reference: str, images: dict[str, gib.MultibootImage]) -> dict[str, ref.RefResult]:
    missing = ref.available(reference)
    if missing is not None:
        _skip(f"reference {reference} is not installed: {missing}")
    with ThreadPoolExecutor(max_workers=len(images) or 1) as pool:
        futures = {name: pool.submit(ref.run_reference, reference, im.elf, REF_TIMEOUT)
                   for name, im in images.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="session")
def bochs_logs(built_images: dict[str, gib.MultibootImage]) -> dict[str, ref.RefResult]:
    return _reference_logs("bochs", built_images)


@pytest.fixture(scope="session")
def qemu_logs(built_images: dict[str, gib.MultibootImage]) -> dict[str, ref.RefResult]:
    return _reference_logs("qemu", built_images)


def idtlab_multiboot_missing(tmp: Path, elf: Path) -> str | None:
    """None if idtlab can load a multiboot image through a scenario, else what is missing."""
    from idtlab import scenario as scn
    from idtlab.errors import BadInput

    toml = tmp / "probe.toml"
    toml.write_text(f'[[image]]\nelf = "{elf}"\nmultiboot = true\n')
    try:
        scn.load(toml)
    except BadInput as e:
        if "not supported yet" in str(e):
            return f"idtlab cannot boot multiboot images yet ([[image]] multiboot = true: {e})"
        raise
    return None


@pytest.fixture(scope="session")
def idtlab_logs(built_images: dict[str, gib.MultibootImage],
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The serial log of every image run on idtlab (a scenario with one multiboot
    [[image]]), or a skip naming the missing feature."""
    from idtlab import scenario as scn

    tmp = tmp_path_factory.mktemp("idtlab-mb")
    first = next(iter(built_images.values()))
    missing = idtlab_multiboot_missing(tmp, first.elf)
    if missing is not None:
        _skip(missing)
    logs: dict[str, str] = {}
    for name, im in built_images.items():
        toml = tmp / f"{name}.toml"
        toml.write_text(textwrap.dedent(f"""\
            [[image]]
            elf = "{im.elf}"
            multiboot = true
            """))
        result = scn.run(scn.load(toml))
        logs[name] = result.serial
    return logs
