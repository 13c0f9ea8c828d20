"""The chat page in headless Chromium (Debian's chromium and chromium-driver, driven by selenium): it loads, lists
the models, streams a reply, and its thumbs and "which is better" write feedback records that yunque reads."""

import json
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
openai = pytest.importorskip("openai")
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.serve.conftest import KEY, MODEL
from yunque.feedback import Preference, Rating, read_feedback

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")
QUESTION = "Tell me about json."


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def set_field(driver, field: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('change'));", field, str(value))


def replies(server, seeds):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    return {s: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                              temperature=1.0, seed=s, max_tokens=24).choices[0].message.content
            for s in seeds}


def click(driver, selector: str) -> None:
    """Click the element as soon as it is there; the page re-renders a conversation when a request ends (the
    feedback POST too), so an element found a moment before may be replaced: find it again, as a user would."""
    def found_and_clicked(d):
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True
    WebDriverWait(driver, 30, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        found_and_clicked)


def wait_for_records(server, n: int):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        folder = server.home / "feedback"
        records = read_feedback([folder]) if folder.is_dir() else []
        if len(records) >= n:
            return records
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} feedback records were written")


def test_page_streams_a_reply_and_writes_feedback(server, browser):
    by_seed = replies(server, range(1, 12))
    seed = next(s for s, r in by_seed.items() if r.strip())
    other = next(s for s, r in by_seed.items() if r.strip() and r != by_seed[seed])
    driver, wait = browser, WebDriverWait(browser, 30)
    driver.get(server.url + "/")
    assert driver.title == "yunque chat"
    set_field(driver, "key", KEY)  # the server wants a key: the page lists the models once it has it
    wait.until(lambda d: [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")] == [MODEL])
    for field, value in (("temperature", 1.0), ("seed", seed), ("max_tokens", 24)):
        set_field(driver, field, value)
    driver.find_element(By.ID, "input").send_keys(QUESTION)
    driver.find_element(By.ID, "send").click()
    reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="1"]'))[0]
    stored = json.loads(driver.execute_script("return localStorage.getItem('yunque.chat')"))
    conversation = stored["conversations"][0]["messages"]
    assert conversation[0] == {"role": "user", "content": QUESTION}
    assert conversation[1]["content"] == by_seed[seed]  # what the API streams for that seed, whole
    assert reply.text.strip()

    click(driver, '.msg.assistant[data-done="1"] .thumb-down')
    (rating,) = wait_for_records(server, 1)
    assert rating == Rating(MODEL, ({"role": "user", "content": QUESTION},), by_seed[seed], -1, "page", rating.time)

    set_field(driver, "seed", other)
    click(driver, ".regenerate")
    click(driver, ".prefer-b")
    preference = wait_for_records(server, 2)[1]
    assert preference == Preference(MODEL, ({"role": "user", "content": QUESTION},), by_seed[other], by_seed[seed],
                                    "page", preference.time)
    # the chosen reply stays; the page saves it once the server has answered the feedback POST, which may be just
    # after the record is on disk
    def kept(d):
        stored = json.loads(d.execute_script("return localStorage.getItem('yunque.chat')"))
        return stored["conversations"][0]["messages"][1]["content"]

    wait.until(lambda d: kept(d) == by_seed[other], "the page did not keep the chosen reply B")


def test_markdown_is_rendered_and_never_raw_html(server, browser):
    browser.get(server.url + "/")
    html = browser.execute_script("return Markdown.render(arguments[0])",
                                  "# Title\n**bold** and `x<y`\n\n- one\n- two\n\n```py\n<script>alert(1)</script>\n```"
                                  "\n<img src=x onerror=alert(1)> [link](javascript:alert(1))")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<pre><code class="language-py">&lt;script&gt;' in html
    assert "<img" not in html and "<script" not in html and 'href="javascript' not in html
