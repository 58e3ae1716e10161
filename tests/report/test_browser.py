"""report.html opens in a real browser (headless Chromium from Debian's package): the page
renders and every embedded image decodes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from medseg.report import study_report, write_study_report
from tests.report.test_reports import _study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: Runs in the page after load; the title carries the result out through --dump-dom.
_PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 50);
  document.title = "IMAGES " + ok.length + "/" + imgs.length;
});
</script>
"""


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI", "").lower() != "true",
                    reason="chromium not installed (.ci/install-system-packages.sh installs "
                    "it; under CI=true this test fails instead)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    image, labels = _study()
    rep = study_report(image, labels, study_id="browser-check", reference=labels)
    html_path = write_study_report(rep, image, labels, tmp_path)["report.html"]
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", _PROBE + "</body>"))
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "<title>IMAGES 3/3</title>" in dom
    assert "Lung report: browser-check" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1100,1400",
                    html_path.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a page with content, not a blank
