"""Generates the Python code of every .proto under protos/ into sdk/aimesh/.

    python scripts/codegen.py          # regenerate in place
    python scripts/codegen.py --check  # fail if the committed code drifts from the protos

The output (``*_pb2.py``, ``*_pb2.pyi`` from mypy-protobuf, ``*_pb2_grpc.py``) is committed;
CI runs ``--check``. Never edit generated files by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api.annotations_pb2
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SDK = ROOT / "sdk"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def googleapis_include() -> Path:
    """Folder holding google/api/*.proto and google/rpc/*.proto (googleapis-common-protos)."""
    return Path(google.api.annotations_pb2.__file__).parent.parent.parent


def generate(out: Path) -> None:
    bindir = Path(sys.executable).parent
    sources = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    command = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTOS}", f"-I{googleapis_include()}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}", f"--mypy_out={out}",
        f"--grpc_python_out={out}", f"--mypy_grpc_out={out}",
        *sources,
    ]
    result = subprocess.run(command, cwd=PROTOS, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"protoc failed:\n{result.stdout}{result.stderr}")
    # Each generated folder is a regular package so `import aimesh.text.v1` works.
    for folder in {p.parent for p in out.rglob("*_pb2.py")}:
        while folder != out / "aimesh":
            (folder / "__init__.py").touch()
            folder = folder.parent


def generated_files(base: Path) -> dict[str, Path]:
    files = {}
    for path in (base / "aimesh").rglob("*"):
        rel = path.relative_to(base).as_posix()
        if path.name.endswith(GENERATED_SUFFIXES) or (
            path.name == "__init__.py" and path.parent.name == "v1"
        ) or (path.name == "__init__.py" and (path.parent / "v1").is_dir()):
            files[rel] = path
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "aimesh").mkdir()
        generate(out)
        fresh, committed = generated_files(out), generated_files(SDK)
        stale = sorted(set(committed) - set(fresh))
        changed = sorted(
            rel for rel in fresh
            if rel not in committed or not filecmp.cmp(fresh[rel], committed[rel], shallow=False)
        )
        if args.check:
            if stale or changed:
                print("generated code drifts from protos/; run: python scripts/codegen.py")
                for rel in changed:
                    print(f"  differs: sdk/{rel}")
                for rel in stale:
                    print(f"  stale:   sdk/{rel}")
                return 1
            print(f"generated code matches protos/ ({len(fresh)} files)")
            return 0
        for rel in stale:
            committed[rel].unlink()
        for rel in changed:
            target = SDK / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh[rel], target)
        print(f"wrote {len(changed)} files, removed {len(stale)} stale ones")
        return 0


if __name__ == "__main__":
    sys.exit(main())
