"""`make demo` runs model_packager.demo: every example is packaged for its target and verifies."""

from pathlib import Path

from model_packager.demo import run


def test_demo_builds_and_verifies_every_example(tmp_path: Path) -> None:
    rows = run(tmp_path / "demo")
    assert [r["package"] for r in rows] == [
        "clinical-1.0.0-x86_64-avx2.efpkg", "clinical-1.0.0-rpi4-aarch64.efpkg",
        "vision-1.0.0-rpi5-aarch64.efpkg", "digits-lite-1.0.0-rpi4-aarch64.efpkg",
    ]
    assert all(r["verified"].startswith("OK") for r in rows)
    assert all(float(r["accuracy"]) > 0.9 for r in rows)
