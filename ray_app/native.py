"""Compiled copies of the door's hottest modules, used only while they match their source.

The PII scrub runs on every key and value of every record posted; in plain Python it is most of
what the door costs. mypyc compiles those modules, as they are written, into C extensions that walk
a record about 2x faster. The source stays ordinary Python and stays the reference: a compiled
copy is put ahead of it only when it was built from exactly the source beside it (SHA-256 of each
file, checked as `ray_app.governance` is imported), for this interpreter. Missing, stale or built
for another Python: the source runs, and nothing else changes.

`make native` builds them (`python -m ray_app.native build`; needs mypy and a C compiler, and says
so when either is missing). The copies live in `ray_app/governance/_native/`, outside git.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

PACKAGE = "ray_app.governance"
MODULES = ("pii", "pii_detect", "pii_phone")
# The mypyc runtime the modules share is one more extension, named after this group: inside the
# package, so it is found where they are.
GROUP = f"{PACKAGE}._scrub"
SOURCE_DIR = Path(__file__).resolve().parent / "governance"
NATIVE_DIR = SOURCE_DIR / "_native"
MANIFEST = "manifest.json"


def fingerprint(source_dir: Path) -> dict[str, str]:
    """What a build must match: each module's source digest and the interpreter's extension ABI."""
    digests = {m: hashlib.sha256((source_dir / f"{m}.py").read_bytes()).hexdigest() for m in MODULES}
    return {"abi": sysconfig.get_config_var("EXT_SUFFIX") or "", **digests}


def use_compiled(package_path: list[str], *, native_dir: Path = NATIVE_DIR,
                 source_dir: Path = SOURCE_DIR) -> bool:
    """Put the compiled copies ahead of the source in the package's search path, if they are current.

    Called from the package's `__init__`, before any of MODULES is imported. Returns whether it did.
    """
    try:
        built = json.loads((native_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if built != fingerprint(source_dir):
        return False
    if str(native_dir) not in package_path:
        package_path.insert(0, str(native_dir))
    return True


def compiled_modules() -> list[str]:
    """The modules of MODULES running compiled in this process (imported as a side effect)."""
    names = []
    for m in MODULES:
        path = getattr(importlib.import_module(f"{PACKAGE}.{m}"), "__file__", "") or ""
        if path.endswith(tuple(EXTENSION_SUFFIXES)):
            names.append(f"{PACKAGE}.{m}")
    return names


def compiler() -> str | None:
    """The path of the C compiler a build would call (setuptools takes it from sysconfig), or None."""
    return shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0])


def build(*, native_dir: Path = NATIVE_DIR, source_dir: Path = SOURCE_DIR) -> Path:
    """Compile MODULES with mypyc into `native_dir` and record what they were built from."""
    try:
        from mypyc.build import mypycify
        from setuptools import Distribution
    except ImportError as exc:
        raise SystemExit(f"cannot compile the PII scrubber: {exc} (pip install 'flywheel[native]')") from exc
    if compiler() is None:
        raise SystemExit("cannot compile the PII scrubber: no C compiler on PATH")
    built_from = fingerprint(source_dir)  # the sources as compiled, not as they may be after
    with tempfile.TemporaryDirectory(prefix="flywheel-native-") as tmp:
        work = Path(tmp)
        # mypy names a module from the package folders above its file: compile copies laid out as
        # the package, so nothing lands in (or is read from) the source tree.
        package = work / "src" / Path(*PACKAGE.split("."))
        package.mkdir(parents=True)
        for parent in (package, *package.parents):
            if parent == work / "src":
                break
            (parent / "__init__.py").touch()
        for m in MODULES:
            shutil.copy2(source_dir / f"{m}.py", package / f"{m}.py")
        cwd = os.getcwd()
        os.chdir(work / "src")
        try:
            extensions = mypycify([f"--cache-dir={work / 'mypy'}", "--ignore-missing-imports",
                                   "--follow-imports=silent",
                                   *(str(Path(*PACKAGE.split("."), f"{m}.py")) for m in MODULES)],
                                  group_name=GROUP, target_dir=str(work / "c"))
            dist = Distribution({"name": "flywheel-native", "ext_modules": extensions})
            command = dist.get_command_obj("build_ext")
            command.build_lib, command.build_temp = str(work / "lib"), str(work / "tmp")
            dist.run_command("build_ext")
        finally:
            os.chdir(cwd)
        built = sorted((work / "lib" / Path(*PACKAGE.split("."))).glob("*" + built_from["abi"]))
        if native_dir.exists():
            shutil.rmtree(native_dir)
        native_dir.mkdir(parents=True)
        for path in built:
            shutil.copy2(path, native_dir / path.name)
    (native_dir / MANIFEST).write_text(json.dumps(built_from, indent=1) + "\n")
    return native_dir


if __name__ == "__main__":  # python -m ray_app.native build
    if sys.argv[1:] != ["build"]:
        raise SystemExit("usage: python -m ray_app.native build")
    where = build()
    print(f"compiled {', '.join(MODULES)} of {PACKAGE} into {where}")
