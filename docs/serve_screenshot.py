"""Take docs/serve-page.png: `yunque serve MODEL` on a free port, the chat page in headless Chromium (Debian's
chromium and chromium-driver), one question asked and its streamed reply rendered.

    python docs/serve_screenshot.py MODEL_DIR [--question TEXT] [--out docs/serve-page.png]
"""

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--question", default="What does json.dumps do?")
    p.add_argument("--out", default=str(Path(__file__).parent / "serve-page.png"))
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = Path(args.model).resolve().name
    server = subprocess.Popen([sys.executable, "-m", "yunque", "serve", f"{name}={args.model}", "--port", str(port),
                               "--preload"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        options = Options()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,760"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(url + "/")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            driver.execute_script("for (const [k, v] of [['temperature', '0.8'], ['seed', '3'], ['max_tokens', '120']])"
                                  " { const e = document.getElementById(k); e.value = v; "
                                  "e.dispatchEvent(new Event('change')); }")
            driver.find_element(By.ID, "input").send_keys(args.question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="1"]'))
            driver.save_screenshot(args.out)
            print(f"wrote {args.out}")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
