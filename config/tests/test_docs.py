"""The Swagger UI page (/api/docs/) comes whole from the app: its files are the app's own
static files, served as they are under `make run` (DEBUG, found where they lie) and in the
image (collected by collectstatic), and the page works under the app's
Content-Security-Policy."""

from __future__ import annotations

import re
import shutil

import pytest
from csp.utils import build_policy
from django.core.management import call_command
from django.test import Client

pytestmark = pytest.mark.django_db

_REFERENCES = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def _references(html: str) -> list[str]:
    return _REFERENCES.findall(html)


def test_docs_page_references_no_other_host(client):
    response = client.get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    references = _references(html)
    assert len(references) >= 5  # favicon, two stylesheets, two bundles, the start-up script
    for url in references:
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
    assert "http://" not in html
    assert "https://" not in html
    assert "<style" not in html
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) is None  # no inline script


@pytest.mark.parametrize("serving", ["collectstatic", "debug"])
def test_every_file_of_the_docs_page_is_served_by_the_app(client, settings, tmp_path, serving):
    if serving == "collectstatic":  # the image: collected at build time, served by whitenoise
        settings.STATIC_ROOT = tmp_path / "static"
        call_command("collectstatic", "--noinput", verbosity=0)
    else:  # `make run`: DEBUG, files served from where the apps keep them
        settings.DEBUG = True
    html = client.get("/api/docs/").content.decode()

    served = {}
    for url in _references(html):
        response = Client().get(url)
        assert response.status_code == 200, url
        served[url] = response
    types = {url.rsplit("/", 1)[-1]: r["Content-Type"] for url, r in served.items()}
    assert types["swagger-ui-bundle.js"].startswith(("text/javascript", "application/javascript"))
    assert types["swagger-ui.css"].startswith("text/css")
    assert types["?script="].startswith("application/javascript")
    script = b"".join(served["/api/docs/?script="])
    assert b"SwaggerUIBundle(" in script
    assert b"/api/schema/" in script


def test_docs_page_is_under_the_apps_own_content_security_policy(client):
    response = client.get("/api/docs/", secure=True)

    assert response["Content-Security-Policy"] == build_policy()
    assert "unsafe-inline" not in response["Content-Security-Policy"]
    assert "cdn" not in response["Content-Security-Policy"]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_swagger_ui_shows_the_operations_in_a_browser_without_a_policy_violation(live_server):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("chromium and chromium-driver are required (apt-get install chromium ...)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        # Every violation of the policy, from the first byte of the page on.
        driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": "window.violations = [];"
                "document.addEventListener('securitypolicyviolation', e => "
                "window.violations.push(e.violatedDirective + ' ' + e.blockedURI));"
            },
        )
        driver.get(f"{live_server.url}/api/docs/")
        WebDriverWait(driver, 20).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".opblock"))
        )

        assert "Tollgate API" in driver.find_element(By.CSS_SELECTOR, ".info .title").text
        paths = {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert "/api/v1/generate" in paths
        # An operation opened: its example bodies drawn by the syntax highlighter.
        driver.find_element(By.ID, "operations-api-api_v1_generate_create").click()
        WebDriverWait(driver, 10).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".highlight-code"))
        )
        assert driver.execute_script("return window.violations") == []
        background = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(250, 250, 250)"  # the page's own stylesheet applied
    finally:
        driver.quit()
