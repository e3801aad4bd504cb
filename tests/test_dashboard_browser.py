"""Browser check: TensorBoard serves a run written with DashboardCallback's layout, headless Chromium renders the
Custom Scalars tab, and the dashboard's groups and charts are on the page.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them when missing) and selenium (dev extra).
"""

import shutil
import socket
import subprocess
import sys
import time

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_opt.tensorboard import dashboard_layout

pytestmark = pytest.mark.timeout(240)

# Walk every shadow root: TensorBoard's dashboards are web components.
_PAGE_TEXT_JS = """
const out = [];
const walk = (node) => {
  if (node.shadowRoot) walk(node.shadowRoot);
  for (const child of node.children || []) walk(child);
  if (node.nodeType === 1 && node.childElementCount === 0 && node.textContent) out.push(node.textContent.trim());
};
walk(document.documentElement);
return out.join("\\n");
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_run(logdir):
    writer = SummaryWriter(str(logdir))
    writer.add_custom_scalars(dashboard_layout())
    for step in range(1, 21):
        writer.add_scalar("train/loss", 2.0 / step, step)
        writer.add_scalar("curvature/lambda_max", 10.0 + step, step)
        writer.add_scalar("curvature/two_over_lr", 20.0, step)
        writer.add_scalar("comm/bytes", 1000.0 * step, step)
        writer.add_scalar("comm/ddp_bytes", 4000.0 * step, step)
        writer.add_scalar("noise/norm", 1.0, step)
    writer.close()


def test_custom_scalars_dashboard_renders_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "install Debian's chromium and chromium-driver (.ci/run does)"
    _write_run(tmp_path / "run")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,2400", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for the server
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
        browser.get(f"http://127.0.0.1:{port}/#custom_scalars")
        text = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = browser.execute_script(_PAGE_TEXT_JS)
            if all(group in text for group in ("Optimization", "Curvature", "Noise", "Communication")):
                break
            time.sleep(1)
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
    finally:
        if browser is not None:
            browser.quit()
        server.kill()
    for group in ("Optimization", "Clipping", "Curvature", "Noise", "Time averages", "Communication"):
        assert group in text, f"{group!r} not shown; page text: {text[:2000]}"
    assert "lambda_max vs 2/lr (edge of stability)" in text
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
