"""The demo page in a real browser: headless Chromium (Debian's package) driven by Playwright, against app.py serving
the tiny pipeline. Fills two rows, reorders them, sets a seed, generates, and waits for the video to play."""

from __future__ import annotations

import os

import pytest
from app_testing import running_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with running_app(tmp_path_factory.mktemp("app"), "--steps", "3") as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#storyboard")
        yield page
        browser.close()


def type_into_cell(page, row: int, col: int, text: str) -> None:
    from playwright.sync_api import expect

    cell = page.locator(f'#storyboard [data-testid="cell-{row}-{col}"]')
    cell.dblclick()
    expect(cell.locator('textarea[aria-label="Edit cell"]')).to_be_focused()  # typing before this loses keys
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    expect(cell.locator("span[data-editable]")).to_have_text(text)


def cell_text(page, row: int, col: int) -> str:
    return page.locator(f'#storyboard [data-testid="cell-{row}-{col}"]').inner_text().strip()


def test_fill_two_rows_generate_and_play(page, tmp_path):
    from playwright.sync_api import expect

    page.click("#clear")
    expect(page.locator("#storyboard-info")).to_have_text("0 segments · 0 s · 0 scenes")
    expect(page.locator("#title textarea, #title input")).to_have_value("")
    page.locator("#title textarea, #title input").fill("Dog and cat")
    type_into_cell(page, 0, 0, "a dog runs")
    page.click("#add-row")
    type_into_cell(page, 1, 0, "a red cat")
    page.locator('#storyboard [data-testid="cell-1-1"] input[type=checkbox]').check()
    expect(page.locator("#storyboard-info")).to_have_text("2 segments · 6 s · 2 scenes")

    page.locator('#storyboard [data-testid="cell-1-0"]').click()  # select row 2, then move it up
    page.click("#move-up")
    expect(page.locator('#storyboard [data-testid="cell-0-0"]')).to_have_text("a red cat")
    assert cell_text(page, 1, 0) == "a dog runs"
    expect(page.locator("#storyboard-info")).to_have_text("2 segments · 6 s · 1 scene")  # a cut on row 1 is moot

    seed_input = page.locator("#seed input")  # the Settings are open from the start
    expect(seed_input).to_have_value("-1")
    seed_input.fill("11")
    seed_input.press("Tab")  # leave the field so the page commits the number before Generate reads it
    expect(seed_input).to_have_value("11")
    page.click("#generate")

    page.wait_for_function("""() => {
        const video = document.querySelector('#video video');
        return video !== null && video.readyState >= 2 && video.currentTime > 0;
    }""")
    state = page.evaluate("""() => {
        const video = document.querySelector('#video video');
        return {readyState: video.readyState, currentTime: video.currentTime, duration: video.duration,
                width: video.videoWidth, height: video.videoHeight};
    }""")
    assert state["readyState"] >= 2 and state["currentTime"] > 0
    assert state["duration"] == pytest.approx(17 / (8 / 3), abs=0.5)  # 17 frames at 8/3 fps
    assert (state["width"], state["height"]) == (32, 32)
    expect(page.locator("#status")).to_contain_text("seed 11")
    expect(page.locator("#status")).to_contain_text("2 segments, 17 frames")
    assert page.locator("#preview img").get_attribute("src")
    video_link = page.locator('#downloads a[href$="/video.mp4"]').get_attribute("href")
    assert page.request.get(video_link).body()[4:8] == b"ftyp"  # an mp4 to download
    storyboard_link = page.locator('#downloads a[href$="/storyboard.json"]').get_attribute("href")
    saved = page.request.get(storyboard_link).json()
    assert saved == {"title": "Dog and cat", "scenes": [{"segments": [{"text": "a red cat"}, {"text": "a dog runs"}]}]}

    screenshot = tmp_path / "demo.png"
    page.mouse.move(0, 0)  # no hover highlight in the picture
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_a_bad_storyboard_shows_the_problem_on_the_page(page):
    from playwright.sync_api import expect

    page.click("#clear")
    # the editor is emptied by the server: typing before it is would add to the last test's text, then be cleared
    expect(page.locator("#storyboard-info")).to_have_text("0 segments · 0 s · 0 scenes")
    type_into_cell(page, 0, 0, "a cat")
    page.click("#add-row")
    page.click("#add-row")
    type_into_cell(page, 2, 0, "a dog")
    page.click("#generate")
    problem = "row 2: no text; write what happens in this segment, or remove the row"
    # the pop-up first: it goes away by itself after 10 s, which a loaded machine can spend on the first check
    expect(page.locator('[data-testid="toast-body"].error')).to_contain_text(problem)
    expect(page.locator("#status")).to_contain_text(problem)  # and stays on the page


def test_loading_a_storyboard_file_fills_the_editor_and_reports_unknown_keys(page, tmp_path):
    from playwright.sync_api import expect

    story = tmp_path / "story.json"
    story.write_text('{"title": "Kiki", "scenes": [{"segments": [{"text": "a cat"}]}, '
                     '{"segments": [{"text": "a dog", "colour": "red"}]}]}')
    page.locator("#files").get_by_text("Storyboard files", exact=True).click()
    page.locator('input[type=file][accept^=".json"]').set_input_files(str(story))  # the Load button's
    expect(page.locator('[data-testid="toast-body"].warning')).to_contain_text(
        "story.json: scenes[1].segments[0]: unknown key 'colour' ignored")
    expect(page.locator('#storyboard [data-testid="cell-1-0"]')).to_have_text("a dog")
    assert page.locator('#storyboard [data-testid="cell-1-1"] input[type=checkbox]').is_checked()
    expect(page.locator("#title textarea, #title input")).to_have_value("Kiki")
    expect(page.locator("#storyboard-info")).to_have_text("2 segments · 6 s · 2 scenes")
