"""Print a rendered report to PDF with headless Chromium (the report's print stylesheet)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from audit.store.files import plain_file_mode

from .html import ReportExistsError


def print_pdf(html: Path, out_pdf: Path | None = None, chromium: str | None = None,
              timeout_s: float = 300) -> Path:
    """Print a rendered report to PDF with headless Chromium (the report's print stylesheet).

    Default output: the HTML's path with ``.pdf``. Next to a run directory's files (a folder with
    run.json) an existing PDF is never overwritten (``ReportExistsError``).
    """
    html = Path(html).resolve()
    out = Path(out_pdf) if out_pdf is not None else html.with_suffix(".pdf")
    if out.exists() and (out.parent / "run.json").is_file():
        raise ReportExistsError(f"{out} already exists inside a run directory, which is never "
                                "modified; pass out_pdf=<a new path>")
    exe = chromium or shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if exe is None:
        raise FileNotFoundError("no Chromium found to print the PDF (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.pdf")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-pings", f"--user-data-dir={profile}",
               "--no-pdf-header-footer", f"--print-to-pdf={tmp}", html.as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout_s)
    if not tmp.is_file():
        raise RuntimeError(f"Chromium did not write {tmp}")
    os.chmod(tmp, plain_file_mode())  # Chromium's own mode would not follow the umask
    os.replace(tmp, out)
    return out
