"""The web page at `/`, driven in Debian's headless Chromium (Playwright), with auth on,
against the real app on fixture weights. Chromium may only reach loopback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import KEY_A as KEY
from tests.conftest import face_photo

ARTIFACTS = Path(__file__).resolve().parent.parent / "out" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
    "--disable-quic", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="module")
def page_url(local_app):
    return local_app["url"] + "/"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("page-photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")  # the demo's sample photo
    Image.fromarray(data.astronaut()).save(folder / "astronaut-copy.png")
    face_photo(blobs=()).save(folder / "empty-room.png")
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (150, 40, 350, 260))  # the astronaut's head
    mask.save(folder / "head-mask.png")
    return folder


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make setup` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    outside: list[str] = []

    def only_loopback(route):
        if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    context.route("**/*", only_loopback)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert not outside, f"the page tried to reach {outside}"
    assert not errors, errors


def test_generate_from_the_sample_photo_with_progress_and_a_result(page, page_url, photos):
    page.goto(page_url)
    page.fill("#api-key", KEY)
    page.set_input_files("#photos", str(photos / "astronaut.png"))
    page.wait_for_selector("text=astronaut.png: face found")
    drawn = page.evaluate("""() => { const c = document.querySelector('#previews canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""")
    assert drawn > 0  # the face box and keypoints are drawn over the preview
    page.select_option("#style", "Watercolor")
    page.select_option("#size", "128x128")
    page.fill("#prompt", "a portrait of an (astronaut:1.2)")
    page.check("#prompt-weighting")
    page.eval_on_selector("#steps", "el => { el.value = '40'; el.dispatchEvent(new Event('input')); }")
    assert page.text_content("#steps-value") == "40"
    page.evaluate("""() => { window.__progress = []; const bar = document.getElementById('progress');
        new MutationObserver(() => window.__progress.push(Number(bar.value)))
          .observe(bar, {attributes: true}); }""")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/generations")) as sent:
        page.click("#generate")
    assert json.loads(sent.value.post_data)["prompt_weighting"] is True
    page.wait_for_selector("#results img", timeout=120_000)
    seen = page.evaluate("window.__progress")
    assert len({v for v in seen if 0 < v < 40}) >= 2, seen  # the bar moved through the steps (a few seconds of rendering)
    assert page.eval_on_selector("#progress", "el => el.value") == 40
    image = page.wait_for_selector("#results img")
    page.wait_for_function("() => document.querySelector('#results img').naturalWidth === 128")
    assert "seed" in image.get_attribute("alt")
    assert page.get_attribute("#results a", "href") and "Done: 1 image" in page.text_content("#status")
    assert page.text_content("#error") == "" or page.is_hidden("#error")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webpage-finished.png"), full_page=True)
    assert (ARTIFACTS / "webpage-finished.png").stat().st_size > 10_000


def test_inpainting_a_face_into_a_picture_with_an_extra_controlnet(page, page_url, photos):
    page.goto(page_url)
    page.fill("#api-key", KEY)
    page.set_input_files("#photos", str(photos / "astronaut-copy.png"))
    page.wait_for_selector("text=astronaut-copy.png: face found")
    page.set_input_files("#image", str(photos / "astronaut.png"))
    page.set_input_files("#mask-image", str(photos / "head-mask.png"))
    page.wait_for_function("() => document.getElementById('strength-value').textContent === '1'")
    page.wait_for_selector("#control-type option[value=depth]", state="attached")
    page.select_option("#control-type", "canny")
    page.set_input_files("#control-image", str(photos / "astronaut.png"))
    page.eval_on_selector("#control-scale", "el => { el.value = '0.7'; el.dispatchEvent(new Event('input')); }")
    page.select_option("#size", "128x128")
    page.eval_on_selector("#steps", "el => { el.value = '2'; el.dispatchEvent(new Event('input')); }")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/generations")) as sent:
        page.click("#generate")
    body = json.loads(sent.value.post_data)
    assert body["image"].startswith("data:image/png;base64,") and body["mask_image"].startswith("data:image/png")
    assert body["strength"] == 1
    [control] = body["controlnets"]
    assert control["type"] == "canny" and control["scale"] == 0.7 and control["preprocessed"] is False
    assert control["image"].startswith("data:image/png;base64,")
    page.wait_for_selector("#results img", timeout=120_000)
    page.wait_for_function("() => document.querySelector('#results img').naturalWidth === 128")
    assert page.text_content("#error") == "" or page.is_hidden("#error")


def test_a_photo_without_a_face_says_so(page, page_url, photos):
    page.goto(page_url)
    page.fill("#api-key", KEY)
    page.set_input_files("#photos", str(photos / "empty-room.png"))
    alert = page.wait_for_selector("#error:not([hidden])")
    assert "No face was found in empty-room.png" in alert.text_content()
    page.click("#generate")  # and generating anyway says it again, clearly
    page.wait_for_function("() => document.getElementById('generate').disabled === false")
    assert "No face was found" in page.text_content("#error")


def test_a_wrong_or_missing_key_is_explained(page, page_url, photos):
    page.goto(page_url)
    page.set_input_files("#photos", str(photos / "astronaut.png"))
    alert = page.wait_for_selector("#error:not([hidden])")
    assert "needs an API key" in alert.text_content()
    page.fill("#api-key", "iid_wrong")
    page.set_input_files("#photos", str(photos / "astronaut-copy.png"))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('not accepted')")


def test_the_page_is_served_by_the_app_alone(page, page_url):
    response = page.goto(page_url)
    headers = response.headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert page.locator("label[for=photos]").count() == 1 and page.locator("label[for=prompt]").count() == 1
    # the style list comes from GET /v1/options, fetched by the page after it loads
    page.wait_for_function("() => document.querySelectorAll('#style option').length >= 9")
    styles = page.eval_on_selector_all("#style option", "options => options.map(o => o.textContent)")
    assert styles[:2] == ["(No style)", "Watercolor"] and len(styles) == 9
