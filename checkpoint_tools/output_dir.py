"""The output directory of a conversion: checked first, written aside, published whole."""

from __future__ import annotations

import shutil
from pathlib import Path

from checkpoint_tools.mcore_checkpoint import ConversionError
from megatron_geno.files import fresh_temp_dir, publish_dir


def check_out(out: Path) -> None:
    """Refuses an --out that is a file, the current directory, or a non-empty directory."""
    if str(out) in (".", "..") or out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ConversionError(f"--out {out} names the current directory or one above it; name "
                              f"a new directory")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; name a new directory")
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory {out} exists and is not empty")


def write_into_new_dir(out: Path, write) -> Path:
    """Runs write(tmp) in a fresh temporary directory beside OUT, then publishes it as OUT.

    On any failure (or interruption) only that temporary directory is removed; OUT is never
    replaced if it holds anything.
    """
    tmp = fresh_temp_dir(out)
    try:
        write(tmp)
        publish_dir(tmp, out)
    except FileExistsError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"output directory {out} was filled by something else while "
                              f"converting; nothing was replaced ({err})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
