"""Drives the dashboard in a real headless Chromium through WebDriver.

Usage: dashboard.py URL PIDS_JSON SCREENSHOT
       dashboard.py --cluster URL NODE PID
       dashboard.py --logs URL PROCESS SCREENSHOT

PIDS_JSON maps each echo worker's process id to its real pid. The script
checks that the page shows every worker with that pid, that its numbers
change without a reload, that a worker killed here (SIGKILL) comes back on
the page with a new pid and one restart, and that the browser console has
no errors. It saves a screenshot to SCREENSHOT and prints one JSON line:
{"killed": ID, "old_pid": N, "new_pid": N}. Any failed check exits non-zero
with the reason on stderr.

With --cluster, the page of a broker in a cluster: NODE (another broker,
pid PID) must be listed as up with its services and a reply rate; the
script then kills it (SIGKILL) and the row must say it is gone, with no
reload and no console errors. It prints {"node": NODE, "gone": true}.

With --logs, the page of a broker whose process PROCESS writes "tick N"
lines to stderr a few times a second: clicking its row must open the logs
panel with its newest lines, and new ticks must appear there without a
reload; clicking the row again closes it. It saves a screenshot with the
panel open and prints {"process": PROCESS, "first": N, "later": M}.
"""

import json
import os
import shutil
import signal
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def fail(message):
    print(f"dashboard check failed: {message}", file=sys.stderr)
    sys.exit(1)


def find(names):
    for name in names:
        path = shutil.which(name) or (name if os.path.exists(name) else None)
        if path:
            return path
    fail(f"none of {names} found (scripts/test installs chromium and chromium-driver)")


def wait_until(what, check, timeout=15.0):
    """Polls `check` until it returns a true value; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # the page may be mid-render
            last = e
        time.sleep(0.2)
    fail(f"{what} (last: {last!r})")


def browser():
    """Headless Chromium through chromium-driver, console logs kept."""
    options = webdriver.ChromeOptions()
    options.binary_location = find(["chromium", "chromium-browser", "/usr/bin/chromium"])
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1400,1000", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=find(["chromedriver", "/usr/bin/chromedriver"]))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    return driver


def no_console_errors(driver):
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    if errors:
        fail(f"browser console errors: {errors}")


def cluster_main(url, node, pid):
    driver = browser()
    try:
        driver.get(url)

        def field(name):
            return driver.find_element(
                By.CSS_SELECTOR, f'tr[data-node="{node}"] [data-field="{name}"]').text

        def row():
            return driver.find_element(By.CSS_SELECTOR, f'tr[data-node="{node}"]').text

        wait_until(f"{node} is listed up", lambda: field("status") == "up")
        wait_until(f"{node} shows its services", lambda: "echo 1" in row())
        wait_until(f"{node} shows a reply rate",
                   lambda: field("rate") not in ("–", "0/s", "0.0/s"))
        os.kill(pid, signal.SIGKILL)
        wait_until(f"{node} is shown gone", lambda: field("status") == "gone", timeout=20)
        if driver.execute_script("return performance.getEntriesByType('navigation').length") != 1:
            fail("more than one navigation")
        no_console_errors(driver)
        print(json.dumps({"node": node, "gone": True}))
    finally:
        driver.quit()


def ticks(driver):
    """The tick numbers shown in the logs panel, in order."""
    text = driver.find_element(By.ID, "logs").text
    return [int(line.rsplit("tick ", 1)[1]) for line in text.splitlines()
            if "tick " in line and line.rsplit("tick ", 1)[1].isdigit()]


def logs_main(url, process, screenshot):
    driver = browser()
    try:
        driver.get(url)
        driver.execute_script("window.__loaded_once = true;")
        row = f'tr[data-process="{process}"]'
        wait_until(f"{process} is listed", lambda: driver.find_elements(By.CSS_SELECTOR, row))
        if driver.find_element(By.ID, "logs-panel").is_displayed():
            fail("the logs panel is open before any click")
        # The rows are redrawn every second: retry a click on a stale one.
        wait_until(f"click {process}", lambda: driver.find_element(
            By.CSS_SELECTOR, f"{row} td").click() is None)
        wait_until("the logs panel opens",
                   lambda: driver.find_element(By.ID, "logs-panel").is_displayed())
        wait_until("the panel names the process",
                   lambda: driver.find_element(By.ID, "logs-process").text == process)
        wait_until("the clicked row is marked", lambda: "selected" in
                   driver.find_element(By.CSS_SELECTOR, row).get_attribute("class"))
        first = wait_until("the panel shows ticks", lambda: ticks(driver))[-1]
        # Each line starts with the time the broker read it.
        line = driver.find_element(By.CSS_SELECTOR, "#logs div").text
        if not (len(line) > 27 and line[4] == "-" and line[10] == "T" and "Z " in line[:30]):
            fail(f"a line without its RFC 3339 time: {line!r}")
        later = wait_until("new ticks appear live",
                           lambda: (t := ticks(driver)) and t[-1] >= first + 3 and t[-1])
        shown = ticks(driver)
        if shown != sorted(shown) or len(shown) != len(set(shown)):
            fail(f"ticks out of order or repeated: {shown}")
        wait_until("the link says live",
                   lambda: driver.find_element(By.ID, "link").text == "live")
        if not driver.execute_script("return window.__loaded_once === true"):
            fail("the page was reloaded")
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        if not driver.save_screenshot(screenshot):
            fail(f"could not save {screenshot}")
        wait_until(f"click {process} again", lambda: driver.find_element(
            By.CSS_SELECTOR, f"{row} td").click() is None)
        wait_until("a second click closes the panel",
                   lambda: not driver.find_element(By.ID, "logs-panel").is_displayed())
        no_console_errors(driver)
        print(json.dumps({"process": process, "first": first, "later": later}))
    finally:
        driver.quit()


def main():
    if sys.argv[1] == "--cluster":
        return cluster_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if sys.argv[1] == "--logs":
        return logs_main(sys.argv[2], sys.argv[3], sys.argv[4])
    url, pids, screenshot = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    driver = browser()
    try:
        driver.get(url)
        driver.execute_script("window.__loaded_once = true;")

        def cell(process, field):
            return driver.find_element(
                By.CSS_SELECTOR, f'tr[data-process="{process}"] [data-field="{field}"]').text

        # Every worker, with its real pid.
        for process, pid in pids.items():
            wait_until(f"{process} shows pid {pid}", lambda: cell(process, "pid") == str(pid))
            # Read through wait_until too: the table is redrawn every
            # second, and a cell found just before a redraw is stale.
            status = wait_until(f"{process} shows a status",
                                lambda: cell(process, "status"))
            if status != "ready":
                fail(f"{process} is {status!r}, not ready")
        wait_until("the link says live",
                   lambda: driver.find_element(By.ID, "link").text == "live")

        # Live numbers: the request counter moves while traffic runs, and the
        # page was never reloaded.
        def requests():
            return driver.execute_script(
                "return document.querySelector('#totals div:nth-child(2) b').textContent")
        first = wait_until("the request total is shown", requests)
        wait_until("the request total changes without a reload",
                   lambda: requests() != first)
        wait_until("a worker shows a message rate",
                   lambda: any(cell(p, "rate") not in ("–", "0/s", "0.0/s") for p in pids))
        if not driver.execute_script("return window.__loaded_once === true"):
            fail("the page was reloaded")
        if driver.execute_script("return performance.getEntriesByType('navigation').length") != 1:
            fail("more than one navigation")
        wait_until("a latency chart is drawn", lambda: driver.find_elements(
            By.CSS_SELECTOR, 'tr[data-service="echo"] svg polyline'))

        # A killed worker: new pid and one restart, on the same page.
        victim = sorted(pids)[-1]
        old_pid = pids[victim]
        os.kill(old_pid, signal.SIGKILL)
        wait_until(f"{victim} shows a new pid",
                   lambda: cell(victim, "pid") not in ("–", str(old_pid)), timeout=20)
        wait_until(f"{victim} shows one restart", lambda: cell(victim, "restarts") == "1")
        wait_until(f"{victim} is ready again", lambda: cell(victim, "status") == "ready")
        new_pid = int(wait_until(f"{victim} shows its pid", lambda: cell(victim, "pid")))

        # Let the chart gather a few more points, then keep a picture.
        time.sleep(2)
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        if not driver.save_screenshot(screenshot):
            fail(f"could not save {screenshot}")

        no_console_errors(driver)
        print(json.dumps({"killed": victim, "old_pid": old_pid, "new_pid": new_pid}))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
