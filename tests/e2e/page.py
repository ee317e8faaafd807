"""JupyterLab as the browser shows it: the page and its notebooks, driven by selenium.

Everything here reads the page (prompts, outputs, dialogs, the kernel indicator)
the way a person would, and waits on a condition of the page with a timeout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver import ActionChains, Chrome, ChromeOptions, ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from .lab import SHOTS, Lab

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Seconds to wait for a page to load and its notebook's kernel to be ready.
OPEN_TIMEOUT = 120
#: A cell's prompt once it has run.
PROMPT = re.compile(r"^\[(\d+)\]:$")


def chromium() -> Chrome:
    """Headless Chromium, as verified on these machines (see ARCHITECTURE.md)."""
    for program in (CHROMIUM, CHROMEDRIVER):
        assert Path(program).exists(), f"{program} is missing: `make e2e-setup` installs it"
    options = ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200"):  # fmt: skip
        options.add_argument(arg)
    return Chrome(options=options, service=ChromeService(executable_path=CHROMEDRIVER))


def wait(driver: Chrome, timeout: float, what: str, condition: Callable[[Chrome], T]) -> T:
    """Wait until ``condition(driver)`` is truthy (elements that JupyterLab renders
    again meanwhile are looked up again); fail with ``what`` after ``timeout`` s."""
    waiter: WebDriverWait[Chrome] = WebDriverWait(
        driver, timeout, poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )  # fmt: skip
    return waiter.until(condition, f"timed out after {timeout} s waiting for {what}")


class Page:
    """One browser tab showing a :class:`Lab` server."""

    def __init__(self, driver: Chrome, lab: Lab) -> None:
        self.driver = driver
        self.lab = lab

    def open(self, name: str, spec: str) -> Notebook:
        """Open notebook ``name`` by its address (/lab/tree/NAME) and wait until its
        kernel of kernelspec ``spec`` is ready."""
        self.driver.get(self.lab.page(f"/lab/tree/{name}"))
        return self.notebook(name, spec)

    def open_in_notebook7(self, name: str, spec: str) -> Notebook:
        """Open notebook ``name`` in Notebook 7 (/notebooks/NAME: one notebook a page,
        no tabs) and wait until its kernel of kernelspec ``spec`` is ready."""
        self.driver.get(self.lab.page(f"/notebooks/{name}"))
        panel = wait(self.driver, OPEN_TIMEOUT, f"Notebook 7's page of {name}",
                     lambda d: d.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel"))  # fmt: skip
        notebook = Notebook(self, name, spec, panel.get_attribute("id") or "")
        wait(self.driver, OPEN_TIMEOUT, f"{name}'s kernel {spec} to be ready",
             lambda _: notebook.kernel_ready())  # fmt: skip
        return notebook

    def open_from_file_browser(self, name: str, spec: str) -> Notebook:
        """Open notebook ``name`` as a person would: a double click in the file browser."""
        item = wait(self.driver, 30, f"{name} in the file browser", lambda d: d.find_element(
            By.XPATH, f"//li[contains(@class, 'jp-DirListing-item')][.//span[text()='{name}']]"
        ))  # fmt: skip
        ActionChains(self.driver).double_click(item).perform()
        return self.notebook(name, spec)

    def notebook(self, name: str, spec: str) -> Notebook:
        """The open notebook ``name``, once its kernel is ready; a kernel-selection
        dialog, if JupyterLab shows one, is answered with ``spec``."""
        # A document's tab is titled "Name: NAME", a line break, "Path: ...".
        selector = f"li.lm-TabBar-tab[data-type='document-title'][title^='Name: {name}\\a ']"
        tab = wait(self.driver, OPEN_TIMEOUT, f"the tab of {name}",
                   lambda d: d.find_element(By.CSS_SELECTOR, selector))  # fmt: skip
        notebook = Notebook(self, name, spec, tab.get_attribute("data-id") or "")

        def ready(_: Chrome) -> bool:
            if self.dialog_title().startswith("Select Kernel"):
                self._choose_kernel(spec)
                return False
            return notebook.kernel_ready()

        wait(self.driver, OPEN_TIMEOUT, f"{name}'s kernel {spec} to be ready", ready)
        return notebook

    def _choose_kernel(self, spec: str) -> None:
        select = Select(self.driver.find_element(By.CSS_SELECTOR, ".jp-Dialog select"))
        for option in select.options:
            value = option.get_attribute("value") or ""
            if value.startswith("{") and json.loads(value).get("name") == spec:
                select.select_by_value(value)
                break
        else:
            raise AssertionError(f"the kernel-selection dialog does not offer {spec}")
        self.accept_dialog()

    def dialog_title(self) -> str:
        """The title of the dialog on the page, or "" when there is none."""
        titles = self.driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-header")
        return titles[0].text.strip() if titles else ""

    def accept_dialog(self) -> None:
        accept = ".jp-Dialog .jp-Dialog-button.jp-mod-accept"
        self.driver.find_element(By.CSS_SELECTOR, accept).click()

    def shot(self, scenario: str) -> None:
        """Save what the page shows to build/e2e/SCENARIO.png."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(SHOTS / f"{scenario}.png"))


class Notebook:
    """One open notebook: its cells as the page shows them, scoped to its own panel
    (another notebook may be open in the same page)."""

    def __init__(self, page: Page, name: str, spec: str, panel_id: str) -> None:
        self.page = page
        self.driver = page.driver
        self.name = name
        self.spec = spec
        self.panel_id = panel_id

    @property
    def panel(self) -> WebElement:
        return self.driver.find_element(By.ID, self.panel_id)

    def kernel_status(self) -> str:
        """The toolbar's kernel indicator: idle, busy, restarting, ..."""
        indicator = self.panel.find_element(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator")
        return indicator.get_attribute("data-status") or ""

    def kernel_ready(self) -> bool:
        name = self.panel.find_element(By.CSS_SELECTOR, ".jp-Toolbar-kernelName").text.strip()
        return name == self.spec and self.kernel_status() == "idle"

    def cell(self, index: int) -> WebElement:
        return self.panel.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[index]

    def prompt(self, index: int) -> str:
        """The cell's input prompt, e.g. "[3]:", "[*]:" or "[ ]:"."""
        return self.cell(index).find_element(By.CSS_SELECTOR, ".jp-InputPrompt").text.strip()

    def count(self, index: int) -> int | None:
        """The execution count the cell's prompt shows, or None."""
        found = PROMPT.match(self.prompt(index))
        return int(found.group(1)) if found else None

    def output(self, index: int) -> str:
        """The text of the cell's output area."""
        outputs = self.cell(index).find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
        return "\n".join(o.text for o in outputs)

    def show(self) -> None:
        """Bring this notebook's tab to the front, if another notebook's is (Notebook 7
        has no tabs)."""
        tabs = self.driver.find_elements(
            By.CSS_SELECTOR, f"li.lm-TabBar-tab[data-id='{self.panel_id}']"
        )
        if not tabs:
            return
        tab = tabs[0]
        if "lm-mod-current" not in (tab.get_attribute("class") or "").split():
            tab.click()
            wait(self.driver, 30, f"{self.name}'s tab to show", lambda _: self.panel.is_displayed())

    def execute(self, index: int) -> None:
        """Run the cell as a person does: bring its notebook to the front, click into
        the cell, press Shift+Enter."""
        self.show()
        self.cell(index).find_element(By.CSS_SELECTOR, ".jp-InputArea-editor .cm-content").click()
        keys = ActionChains(self.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER)
        before = self.prompt(index)
        keys.key_up(Keys.SHIFT).perform()
        wait(self.driver, 30, f"cell {index} of {self.name} to start", lambda _: (
            self.prompt(index) in ("[*]:", "") or self.prompt(index) != before
        ))  # fmt: skip

    def run(self, index: int, timeout: float = 120) -> str:
        """Run the cell and wait until its prompt shows a count and the kernel is idle;
        its output text."""
        self.execute(index)
        wait(self.driver, timeout, f"cell {index} of {self.name} to finish", lambda _: (
            self.count(index) is not None and self.kernel_status() == "idle"
        ))  # fmt: skip
        return self.output(index)

    def wait_restarted(self, index: int, timeout: float = 120) -> None:
        """Cell ``index`` killed the kernel: wait until JupyterLab has cleared the cell's
        prompt and the restarted kernel is ready, dismissing the "Kernel Restarting"
        dialog if it shows one."""
        wait(self.driver, timeout, f"the kernel's death in cell {index}", lambda _: (
            self.prompt(index) == "[ ]:" or self.page.dialog_title() == "Kernel Restarting"
        ))  # fmt: skip

        def ready(_: Chrome) -> bool:
            if self.page.dialog_title() == "Kernel Restarting":
                self.page.accept_dialog()
                return False
            return self.kernel_ready()

        wait(self.driver, timeout, f"{self.name}'s kernel to be ready again", ready)

    def find(self, index: int, xpath: str, timeout: float = 60, what: str = "") -> WebElement:
        """The element at ``xpath`` (relative to cell ``index``, e.g. ".//button")
        once the cell shows it."""
        return wait(self.driver, timeout, what or f"{xpath} in cell {index}", lambda _: (
            self.cell(index).find_element(By.XPATH, xpath)
        ))  # fmt: skip

    def wait_output(self, index: int, text: str, timeout: float = 60) -> str:
        """Wait until the cell's output shows ``text``; its output text."""

        def shown(_: Chrome) -> str:
            output = self.output(index)
            return output if text in output else ""

        return wait(self.driver, timeout, f"{text!r} in cell {index}'s output", shown)

    def prompts(self) -> list[str]:
        return [self.prompt(i) for i in range(len(self.panel.find_elements(
            By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))]  # fmt: skip
