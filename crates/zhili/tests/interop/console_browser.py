"""The console in a real browser: headless Debian Chromium driven by Selenium (chromedriver from
Debian, no driver download). Logs in with a token, watches an instance turn critical without a
reload, meets a KV CAS conflict, sees a topology edge appear after traffic through the gateway,
approves a plan and follows it to the end, saves a screenshot of every view (desktop and phone
width), and fails on any error in the browser console.

usage: console_browser.py API_URL GATEWAY_URL TOKEN SCREENSHOT_DIR READER_TOKEN
"""
import base64
import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

API, GATEWAY, TOKEN, SHOTS, READER = sys.argv[1:6]
os.environ.setdefault("SE_AVOID_STATS", "true")
os.makedirs(SHOTS, exist_ok=True)
WAIT = 20


def call(method, path, body=None, raw=False):
    data = None if body is None else (body.encode() if raw else json.dumps(body).encode())
    req = urllib.request.Request(API + path, data=data, method=method, headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
        return json.loads(text) if text else None


options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900", "--no-first-run"):
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(driver, WAIT)
errors = []


def collect_console(expected_statuses=()):
    """Browser console errors so far; a network entry for an answer the step expects is fine."""
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        if entry.get("source") == "network" and any(f"status of {s}" in entry["message"] for s in expected_statuses):
            continue
        errors.append(entry["message"])


def shot(name):
    driver.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def visit(path, ready_css):
    driver.get(API + path)
    return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ready_css)))


try:
    # Log in with the token.
    visit("/ui/login", "#token")
    shot("login")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "cards"), "services"))
    wait.until(EC.text_to_be_present_in_element((By.ID, "who"), "log out"))
    shot("overview")
    collect_console()

    # An instance turns critical while the page is open: no reload.
    visit("/ui/services/web", "tr[data-instance='web-1'] .health .passing")
    shot("service-web")
    marker = driver.execute_script("window.__noReload = 1; return window.__noReload")
    call("PUT", "/api/v1/services/web/instances/web-1/checks/alive", {"status": "critical", "output": "disk full"})
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr[data-instance='web-1'] .health .critical")))
    assert driver.execute_script("return window.__noReload") == marker, "the page reloaded"
    assert "disk full" in driver.find_element(By.CSS_SELECTOR, "tr[data-instance='web-1']").text
    shot("service-web-critical")
    visit("/ui/services", "#list table")
    wait.until(EC.text_to_be_present_in_element((By.ID, "list"), "web"))
    shot("services")
    collect_console()

    # KV: someone else writes while the editor is open; saving reports the conflict, overwrites nothing.
    visit("/ui/kv/config/web/db", "#kvvalue")
    assert driver.find_element(By.ID, "kvvalue").get_attribute("value") == "postgres://v1"
    call("PUT", "/api/v1/kv/config/web/db", "postgres://someone-else", raw=True)
    box = driver.find_element(By.ID, "kvvalue")
    box.clear()
    box.send_keys("postgres://mine")
    driver.find_element(By.CSS_SELECTOR, "#kvform button[type=submit]").click()
    wait.until(EC.presence_of_element_located((By.ID, "cas-conflict")))
    stored = call("GET", "/api/v1/kv/config/web/db")
    assert base64.b64decode(stored["value"]).decode() == "postgres://someone-else", stored
    shot("kv-conflict")
    collect_console(expected_statuses=(409,))

    # Topology: traffic through the gateway draws an edge gateway -> web.
    visit("/ui/topology", "svg.topology")
    for _ in range(30):
        urllib.request.urlopen(GATEWAY + "/", timeout=10).read()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "g.edge[data-to='default/web']")))
    label = driver.find_element(By.CSS_SELECTOR, "g.edge[data-to='default/web'] text").text
    assert "r/s" in label and "err" in label and "p99" in label, label
    shot("topology")
    collect_console()

    # A plan waiting for approval: approve it from the console and follow it to the end.
    visit("/ui/plans/nightly", "#plan-status")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button[data-action='approve']")))
    shot("plan-waiting")
    driver.find_element(By.CSS_SELECTOR, "button[data-action='approve']").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "plan-status"), "succeeded"))
    assert call("GET", "/api/v1/kv/config/web/flag") is not None
    shot("plan-done")
    collect_console()

    # Every other view renders; the keyboard reaches the navigation.
    for path, ready, name in [
        ("/ui/routes", "#routes table", "routes"),
        ("/ui/streams", "#streams table", "streams"),
        ("/ui/transactions", "#txns table", "transactions"),
        ("/ui/plans", "#plans table", "plans"),
        ("/ui/acl", "#tokens table", "acl"),
    ]:
        visit(path, ready)
        time.sleep(0.3)
        shot(name)
    # The live tail of $registry shows the registrations above.
    visit("/ui/streams/%24registry", "#tail")
    wait.until(lambda d: "io.zhili.registry" in d.find_element(By.ID, "tail").text)
    shot("stream-tail")
    driver.find_element(By.TAG_NAME, "body").send_keys("\ue004")  # Tab: the skip link first
    focused = driver.switch_to.active_element
    assert focused.tag_name == "a", focused.tag_name
    collect_console()

    # A read-only token sees the service but is not offered maintenance.
    visit("/ui/login", "#token")
    driver.find_element(By.ID, "token").send_keys(READER)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "cards"), "services"))
    visit("/ui/services/web", "tr[data-instance='web-1'] button[data-maint]")
    assert not driver.find_element(By.CSS_SELECTOR, "tr[data-instance='web-1'] button[data-maint]").is_enabled(), "maintenance offered to a reader"
    shot("reader-service")
    collect_console()

    # Phone width.
    driver.set_window_size(390, 844)
    visit("/ui/services/web", "tr[data-instance='web-1']")
    shot("phone-service")
    visit("/ui/", "#cards .card")
    shot("phone-overview")
    collect_console()
finally:
    try:
        collect_console()
    finally:
        driver.quit()

if errors:
    print("browser console errors:\n" + "\n".join(errors))
    sys.exit(1)
print("console ok: login, live health, CAS conflict, topology edge, plan approval; screenshots in", SHOTS)
