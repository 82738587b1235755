"""End to end in a real headless browser (Debian's chromium, driven by Selenium through
the system chromedriver): an operator lowers a plan's requests-per-minute in the admin and
the next API call with a key on that plan is refused at the new limit."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PASSWORD = "operator-password-for-tests"


@pytest.fixture
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            "chromium and chromium-driver are required (apt-get install chromium "
            "chromium-driver; .ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def _generate(base_url: str, key: str, prompt: str) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        f"{base_url}/api/v1/generate",
        data=json.dumps({"prompt": prompt, "max_tokens": 16}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


@pytest.mark.usefixtures("redis_conn", "local_model")
def test_operator_lowers_plan_rpm_in_admin_and_next_call_is_refused(
    browser, live_server, settings, django_user_model
):
    from selenium.webdriver.common.by import By

    from quotas.models import Plan
    from quotas.services import key_create
    from quotas.tests.factories import UserFactory, UserQuotaFactory

    # Plain HTTP on loopback: cookies must not be Secure-only for this browser session.
    settings.SESSION_COOKIE_SECURE = False
    settings.CSRF_COOKIE_SECURE = False
    django_user_model.objects.create_superuser("operator", "op@example.com", PASSWORD)
    plan = Plan.objects.create(name="team", requests_per_minute=5)
    client_user = UserQuotaFactory(user=UserFactory(username="client-app"), plan=plan).user
    full_key, _ = key_create(user=client_user, name="e2e")

    # Under the plan's original limit of 5 a minute, three calls go through.
    for n in range(3):
        status, body, _ = _generate(live_server.url, full_key, f"question {n}")
        assert status == 200, body

    # The operator signs in to the admin and lowers the plan to 3 requests a minute.
    browser.get(f"{live_server.url}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert browser.find_element(By.ID, "operations-module")  # admin index, dashboard linked
    browser.get(f"{live_server.url}/admin/quotas/plan/{plan.pk}/change/")
    field = browser.find_element(By.NAME, "requests_per_minute")
    assert field.get_attribute("value") == "5"
    field.clear()
    field.send_keys("3")
    browser.find_element(By.NAME, "_save").click()
    assert "was changed successfully" in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    plan.refresh_from_db()
    assert plan.requests_per_minute == 3

    # The very next call with a key on that plan is refused at the new limit.
    status, body, headers = _generate(live_server.url, full_key, "question 3")
    assert status == 429, body
    error = body["error"]
    assert error["code"] == "quota_exceeded"
    assert error["dimension"] == "requests_per_minute"
    assert error["limit"] == 3
    assert int(headers["Retry-After"]) >= 1

    # The dashboard shows the day's traffic and the refusal; keep a screenshot of it.
    browser.get(f"{live_server.url}/admin/dashboard/")
    assert browser.find_element(By.ID, "today-requests").text == "3"
    assert "requests_per_minute" in browser.find_element(By.ID, "denials").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.dashboard-svg")) == 3
    ARTIFACTS.mkdir(exist_ok=True)
    browser.set_window_size(1400, browser.execute_script("return document.body.scrollHeight"))
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
