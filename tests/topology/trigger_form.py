"""The Airflow 3.3 UI's Trigger dialog, driven in headless Chromium by Selenium, as a user uses it.

Selectors are the UI's own stable names, read from its bundle (``airflow/ui/dist``): the login
form's ``username``/``password`` inputs, the header button labelled "Trigger Dag", the dialog
(``role=dialog``), its accordion sections (buttons with ``aria-expanded`` named after the params'
``section``), each param's input ``name=element_<param>``, and the dialog's submit button
(``data-testid=trigger-dag-submit``). Every step waits explicitly, with a bounded timeout.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from urllib.parse import unquote

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

DEBIAN_PACKAGES = "chromium chromium-driver"
DIALOG = (By.CSS_SELECTOR, "[role=dialog]")
SUBMIT = (By.CSS_SELECTOR, "[role=dialog] [data-testid=trigger-dag-submit]")


class BrowserUnavailable(RuntimeError):
    """Chromium or its driver is not installed, or will not start."""


class FormStepFailed(AssertionError):
    """A step of the form did not reach the state it waits for within its timeout."""


@dataclass(frozen=True)
class BrowserConfig:
    chromium: str
    chromedriver: str
    artifacts_dir: str
    timeout_s: float = 60.0
    window: tuple[int, int] = (1400, 1800)

    def __post_init__(self) -> None:
        for name in ("chromium", "chromedriver"):
            path = getattr(self, name)
            if not (path and os.path.isfile(path) and os.access(path, os.X_OK)):
                raise BrowserUnavailable(
                    f"{name} not found or not executable ({path!r}): install the Debian packages {DEBIAN_PACKAGES}"
                )
        if not self.artifacts_dir:
            raise ValueError("artifacts_dir must be a directory path")
        if not 0 < self.timeout_s <= 600:
            raise ValueError(f"timeout_s must be in (0, 600], got {self.timeout_s}")
        if min(self.window) < 320:
            raise ValueError(f"window must be at least 320x320, got {self.window}")

    @classmethod
    def from_env(cls, root: str) -> BrowserConfig:
        """Chromium and chromedriver from PATH; screenshots under ``$TEST_ARTIFACTS_DIR/browser``,
        else ``<repo>/test-artifacts/browser``."""
        base = os.environ.get("TEST_ARTIFACTS_DIR") or os.path.join(root, "test-artifacts")
        return cls(
            chromium=shutil.which("chromium") or "",
            chromedriver=shutil.which("chromedriver") or "",
            artifacts_dir=os.path.join(base, "browser"),
        )


def start_chromium(config: BrowserConfig) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = config.chromium
    options.add_argument("--headless=new")
    options.add_argument(f"--window-size={config.window[0]},{config.window[1]}")
    # /dev/shm is small in containers; Chromium falls back to /tmp
    options.add_argument("--disable-dev-shm-usage")
    if os.geteuid() == 0:
        # Chromium refuses to start its sandbox as root (CI runs as root): the instance exits at
        # once ("session not created"). It only loads the local api-server here.
        options.add_argument("--no-sandbox")
    try:
        return webdriver.Chrome(options=options, service=Service(config.chromedriver))
    except WebDriverException as exc:
        raise BrowserUnavailable(f"Chromium did not start: {exc.msg}") from exc


class TriggerDialog:
    """One browser session against one api-server: log in, open a DAG's Trigger dialog, fill
    params, submit, read what the dialog says. Screenshots go to ``config.artifacts_dir``."""

    def __init__(self, driver: webdriver.Chrome, base_url: str, config: BrowserConfig):
        self.driver, self.base_url, self.config = driver, base_url.rstrip("/"), config
        # the UI re-renders what a condition reads (toasts, fields): a stale element is retried
        self.wait = WebDriverWait(driver, config.timeout_s, ignored_exceptions=(StaleElementReferenceException,))
        self._timeouts = 0
        os.makedirs(config.artifacts_dir, exist_ok=True)

    # ------------------------------------------------------------------ waiting
    def _until(self, condition, what: str):
        try:
            return self.wait.until(condition)
        except TimeoutException:
            self._timeouts += 1
            shot = self.screenshot(f"timeout-{self._timeouts}")
            raise FormStepFailed(
                f"{what}: not reached within {self.config.timeout_s:.0f}s (screenshot {shot})"
            ) from None

    def screenshot(self, name: str) -> str:
        path = os.path.join(self.config.artifacts_dir, f"{name}.png")
        self.driver.save_screenshot(path)
        return path

    # ------------------------------------------------------------------ steps
    def open_dag(self, dag_id: str, username: str, password: str) -> None:
        """The DAG's page; through the Simple auth manager's login form when it redirects there."""
        self.driver.get(f"{self.base_url}/dags/{dag_id}")
        trigger = (By.CSS_SELECTOR, "button[aria-label='Trigger Dag']")
        self._until(
            lambda d: d.find_elements(By.NAME, "username") or d.find_elements(*trigger),
            "the DAG page or the login form",
        )
        if self.driver.find_elements(By.NAME, "username"):
            self.driver.find_element(By.NAME, "username").send_keys(username)
            self.driver.find_element(By.NAME, "password").send_keys(password)
            self.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        self._until(ec.element_to_be_clickable(trigger), f"the Trigger button on the page of {dag_id}")

    def open(self) -> None:
        self.driver.find_element(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click()
        # the UI keeps other (hidden) dialogs in the page: wait for a shown one
        self._until(lambda d: any(e.is_displayed() for e in d.find_elements(*DIALOG)), "the Trigger dialog")
        self._until(ec.presence_of_element_located(SUBMIT), "the dialog's Trigger button")

    def section(self, title: str) -> None:
        """Expand the accordion section *title* (a param's ``section``) if it is collapsed."""
        xpath = f"//*[@role='dialog']//button[@aria-expanded][normalize-space(.)='{title}']"
        button = self._until(ec.element_to_be_clickable((By.XPATH, xpath)), f"the form section {title!r}")
        if button.get_attribute("aria-expanded") != "true":
            button.click()
            self._until(lambda d: button.get_attribute("aria-expanded") == "true", f"section {title!r} expanded")

    def field(self, param: str) -> WebElement:
        return self._until(ec.visibility_of_element_located((By.NAME, f"element_{param}")), f"the field {param}")

    def fill(self, param: str, value: str) -> WebElement:
        """Replace the field's text with *value*, typed as keys (what the React form listens to).

        One key at a time, each waited for: on a loaded machine a controlled input re-rendering
        between two fast keystrokes drops one."""
        element = self.field(param)
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        self.wait_value(element, "", param)
        for end in range(1, len(value) + 1):
            element.send_keys(value[end - 1])
            self.wait_value(element, value[:end], param)
        return element

    def wait_value(self, element: WebElement, value: str, what: str) -> None:
        self._until(lambda d: element.get_attribute("value") == value, f"{what} to read {value!r}")

    def blur(self, element: WebElement) -> None:
        element.send_keys(Keys.TAB)

    def submit_enabled(self) -> bool:
        return self.driver.find_element(*SUBMIT).is_enabled()

    def wait_submit_enabled(self, enabled: bool) -> None:
        state = "enabled" if enabled else "disabled"
        self._until(lambda d: d.find_element(*SUBMIT).is_enabled() == enabled, f"the Trigger button {state}")

    def submit(self) -> None:
        self.wait_submit_enabled(True)
        self.driver.find_element(*SUBMIT).click()

    def wait_closed(self) -> None:
        self._until(ec.invisibility_of_element_located(SUBMIT), "the Trigger dialog to close")

    def wait_run_page(self, dag_id: str) -> str:
        """After a successful trigger the UI opens the new run's page: its run id."""
        prefix = f"{self.base_url}/dags/{dag_id}/runs/"
        self._until(lambda d: d.current_url.startswith(prefix), "the new run's page")
        return unquote(self.driver.current_url[len(prefix) :].split("/")[0].split("?")[0])

    def wait_dialog_text(self, text: str) -> str:
        """Wait until the open dialog shows *text*; return the dialog's whole visible text."""
        self._until(lambda d: any(text in e.text for e in d.find_elements(*DIALOG) if e.is_displayed()), repr(text))
        return "\n".join(e.text for e in self.driver.find_elements(*DIALOG) if e.is_displayed())

    def wait_toast(self, text: str) -> str:
        """Wait for a notification (``role=status``) containing *text*; return its text."""
        found = self._until(
            lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "[role=status]") if text in e.text],
            f"a notification saying {text!r}",
        )
        return found[0]
