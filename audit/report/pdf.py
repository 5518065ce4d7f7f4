"""Print a rendered report to PDF with headless Chromium (the report's print stylesheet)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from audit.store.files import plain_file_mode, sha256_file

from .certificate import REPORT_SHA_SLOT
from .context import css_text
from .html import ReportExistsError


def with_report_sha256(html: Path, folder: Path) -> Path:
    """A copy of ``html`` in ``folder`` whose printed footer names the sha256 of ``html`` (the
    report file itself cannot carry its own hash). A report without the slot is copied as is."""
    digest = sha256_file(html)
    text = html.read_text(encoding="utf-8")
    line = css_text(f"{html.name} sha256 {digest}")  # a file name may hold a quote
    filled = text.replace(REPORT_SHA_SLOT, f'"\\A {line}"', 1)
    copy = folder / html.name
    copy.write_text(filled, encoding="utf-8")
    return copy


def print_pdf(html: Path, out_pdf: Path | None = None, chromium: str | None = None,
              timeout_s: float = 300) -> Path:
    """Print a rendered report to PDF with headless Chromium (the report's print stylesheet);
    every page's footer names the run, the page and the sha256 of ``html``.

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
        printed = with_report_sha256(html, Path(profile))
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-pings", f"--user-data-dir={profile}",
               "--no-pdf-header-footer", f"--print-to-pdf={tmp}", printed.as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout_s)
    if not tmp.is_file():
        raise RuntimeError(f"Chromium did not write {tmp}")
    os.chmod(tmp, plain_file_mode())  # Chromium's own mode would not follow the umask
    os.replace(tmp, out)
    return out
