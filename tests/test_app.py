"""The Gradio demo (app.py, pipeline/demo/): its API through gradio_client against the app served on localhost with
the tiny pipeline, and the editor's helpers on their own."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import torch
from app_testing import running_app, table
from tiny_ttt_pipeline import FRAMES_PER_SEGMENT_PIXELS, expected_num_frames

from pipeline.demo import (
    PREVIEW_HEIGHT,
    OutputFolders,
    edit_table,
    latent_preview,
    rows_from_storyboard,
    storyboard_from_rows,
    storyboard_summary,
)
from pipeline.storyboard import StoryboardError, load_storyboard

ROOT = Path(__file__).resolve().parents[1]
MAX_SEGMENTS = 3
MAX_QUEUE = 2
RUNNING = {"PROCESSING", "ITERATING", "PROGRESS"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    root = tmp_path_factory.mktemp("app")
    with running_app(root, "--steps", "2", "--max-segments", str(MAX_SEGMENTS), "--max-queue", str(MAX_QUEUE)) as url:
        yield Client(url, verbose=False, download_files=str(root / "downloads"))


def generate(client, rows, seed: int = -1, steps: int = 2, sampler: str = "ddim", title: str = "",
             negative_text: str = "", guidance: float = 6.0, cache: str = "none", memory: float = 0.0):
    """preview (png path), video (mp4 path), downloads (paths), status (markdown) of one /generate call."""
    return client.predict(table(*rows), title, negative_text, steps, guidance, False, seed, sampler, cache, memory,
                          api_name="/generate")


def submit(client, rows, steps: int):
    return client.submit(table(*rows), "", "", steps, 6.0, False, 0, "ddim", api_name="/generate")


def decode(path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate)


TWO_ROWS = [["a red cat", False, ""], ["a dog runs", True, "blurry"]]


def test_two_segments_give_a_playable_mp4_with_the_storyboard_and_a_preview(client):
    preview, video, downloads, status = generate(client, TWO_ROWS, title="Cat and dog")

    frames, fps = decode(video)
    assert frames.shape == (expected_num_frames(2), 32, 32, 3)
    assert fps == pytest.approx(FRAMES_PER_SEGMENT_PIXELS / 3.0, rel=1e-3)
    assert frames.std() > 0  # decoded pictures, not a blank stream

    names = sorted(Path(p).name for p in downloads)
    assert names == ["storyboard.json", "video.mp4"]
    storyboard = load_storyboard(next(p for p in downloads if p.endswith(".json")))
    assert storyboard.title == "Cat and dog"
    assert storyboard.texts == ["a red cat", "a dog runs"]
    assert [s.scene_start for s in storyboard.segments] == [False, True]
    assert [s.negative_text for s in storyboard.segments] == [None, "blurry"]

    from PIL import Image

    with Image.open(preview) as image:  # one preview frame per segment, side by side with a 2-pixel gap
        assert image.size == (2 * PREVIEW_HEIGHT + 2, PREVIEW_HEIGHT)
    assert "seed **" in status and f"{expected_num_frames(2)} frames" in status


def test_a_fixed_seed_repeats_the_video_and_the_settings_matter(client):
    runs = [generate(client, TWO_ROWS, seed=7), generate(client, TWO_ROWS, seed=7),
            generate(client, TWO_ROWS, seed=8), generate(client, TWO_ROWS, seed=7, sampler="dpm")]

    assert ["seed **7**" in run[3] for run in runs] == [True, True, False, True]
    first, again, other_seed, dpm = (decode(run[1])[0].astype(float) for run in runs)
    # the same pixels up to H.264's own jitter: libx264 does not encode identical frames byte-identically here
    # (about 0.2 levels on average), while another seed or sampler moves them by about 20
    assert np.abs(first - again).mean() < 1
    assert np.abs(first - other_seed).mean() > 5
    assert np.abs(first - dpm).mean() > 5


@pytest.mark.parametrize("rows, settings, message", [
    pytest.param([["", False, ""], ["a dog", False, ""]], {}, r"row 1: no text", id="empty-row"),
    pytest.param([["a cat", False, ""]] * (MAX_SEGMENTS + 1), {}, rf"the maximum is {MAX_SEGMENTS}",
                 id="too-many-rows"),
    pytest.param([["a cat", False, "x" * 1001]], {}, r"row 1 negative text: 1001 characters; the limit is 1000",
                 id="long-negative"),
    pytest.param([["a cat", False, ""], ["a dog that runs around the garden all day", False, ""]], {},
                 r"row 2: text has \d+ tokens, over the text encoder's budget", id="token-budget"),  # the pipeline's
    pytest.param(TWO_ROWS, {"steps": 0}, r"Value 0 is less than minimum value 1", id="zero-steps"),  # gradio's
    pytest.param(TWO_ROWS, {"steps": 2.5}, r"steps: expected a whole number from 1 to 200", id="fractional-steps"),
    pytest.param(TWO_ROWS, {"seed": -5}, r"seed: expected -1 \(random\) or a whole number", id="negative-seed"),
    pytest.param(TWO_ROWS, {"sampler": "euler"}, r"'euler' .* is not in the list of choices", id="unknown-sampler"),
    pytest.param(TWO_ROWS, {"memory": 2.0, "cache": "pab"},
                 r"cache: cache 'pab' keeps one state for every transformer call", id="memory-guidance-with-pab"),
])
def test_bad_input_is_reported_readably(client, rows, settings, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        generate(client, rows, **settings)


def test_the_app_keeps_serving_after_a_pipeline_error(client):
    from gradio_client.exceptions import AppError

    job = submit(client, [["a dog that runs around the garden all day", False, ""]], steps=2)
    with pytest.raises(AppError, match="row 1: text has"):
        job.result(timeout=60)
    status = [out[3] for out in job.outputs() if isinstance(out[3], str)][-1]
    assert status.startswith("**Check the storyboard:**<br>row 1: text has")  # the message stays in the status box
    frames, _ = decode(generate(client, TWO_ROWS[:1])[1])
    assert len(frames) == expected_num_frames(1)


def test_stop_ends_the_run_after_the_current_step(client):
    job = submit(client, TWO_ROWS, steps=40)
    deadline = time.monotonic() + 60
    # wait for the first preview (every 4th step) so the run is under way
    while not any(isinstance(out[0], str) for out in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "no preview arrived"
        time.sleep(0.05)
    client.predict(api_name="/stop")
    preview, video, downloads, status = job.result(timeout=60)
    assert status.startswith("Stopped (stopped after ") and "of 40 steps" in status
    assert video is None and downloads is None
    assert generate(client, TWO_ROWS)[3].startswith("Done in")  # a new run is not stopped by the old flag


def test_one_generation_at_a_time_and_a_bounded_queue(client):
    from gradio_client.utils import QueueError

    long_job = submit(client, TWO_ROWS, steps=60)
    deadline = time.monotonic() + 60
    while long_job.status().code.name not in RUNNING:
        assert time.monotonic() < deadline and not long_job.done()
        time.sleep(0.05)
    waiting = [submit(client, TWO_ROWS, steps=1) for _ in range(MAX_QUEUE)]
    while not all(job.status().code.name == "IN_QUEUE" for job in waiting):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    overflow = submit(client, TWO_ROWS, steps=1)
    with pytest.raises(QueueError, match="Queue is full"):
        overflow.result(timeout=60)
    assert long_job.status().code.name in RUNNING  # still the only one running

    # Stop is not queued (queue=False): the page posts it straight to /run/stop, so it works with a full queue
    response = httpx.post(f"{client.src.rstrip('/')}/gradio_api/run/stop",
                          json={"data": [], "session_hash": client.session_hash}, timeout=30)
    assert response.status_code == 200 and response.json()["data"] == ["Stopping after the current step…"]
    assert long_job.result(timeout=60)[3].startswith("Stopped")
    for job in waiting:
        assert job.result(timeout=60)[3].startswith("Done in")


def test_examples_load_and_storyboards_save_and_load_through_the_api(client, tmp_path):
    from gradio_client import handle_file

    rows, title, negative_text = client.predict("two_scenes.yaml", api_name="/load_example")
    expected = load_storyboard(ROOT / "examples" / "two_scenes.yaml")
    assert rows["data"] == rows_from_storyboard(expected)
    assert title == expected.title

    saved = client.predict(table(*TWO_ROWS), "Cat and dog", "dark", "yaml", api_name="/save_storyboard")
    assert saved.endswith(".yaml")
    storyboard = load_storyboard(saved)
    assert (storyboard.title, storyboard.negative_text, storyboard.texts) == ("Cat and dog", "dark",
                                                                           ["a red cat", "a dog runs"])

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^Cat_and_dog\.txt: the \.txt format has no negative texts"):
        client.predict(table(*TWO_ROWS), "Cat and dog", "", "txt", api_name="/save_storyboard")

    rows, title, negative_text = client.predict(handle_file(saved), api_name="/load_storyboard")
    assert rows["data"] == [["a red cat", False, "", False], ["a dog runs", True, "blurry", False]]
    assert (title, negative_text) == ("Cat and dog", "dark")

    bad = tmp_path / "bad.json"
    bad.write_text('{"scenes": [{"segments": [{"txt": "a cat"}]}]}')
    with pytest.raises(AppError, match=r"^bad\.json: scenes\[0\]\.segments\[0\]\.text: missing"):
        client.predict(handle_file(str(bad)), api_name="/load_storyboard")


def test_app_exits_with_one_line_when_the_model_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--model", str(tmp_path / "missing")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"app.py: error: --model: no such directory: {tmp_path}/missing"]


def test_app_exits_with_one_line_when_the_port_is_in_use(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        # the same call in a process that then says what it had imported: the port is checked before the model is
        # loaded (diffusers) and before gradio is imported
        probe = (f"import sys, app\ntry:\n    app.main(['--port', '{port}'])\nexcept app.UsageError:\n"
                 "    print(sorted(m for m in ('diffusers', 'gradio', 'transformers') if m in sys.modules))")
        imported = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"app.py: error: --port {port}: cannot listen on 127.0.0.1:{port} (already in use); pick another --port"]
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr


def test_an_uploaded_alias_bomb_is_refused_fast_with_little_memory(tmp_path):
    import tracemalloc

    import gradio as gr
    from test_storyboard import alias_bomb

    from pipeline.demo.page import _load_into_editor

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(4, 600, "x" * 1000))  # 13 kB; without the limits, 130 billion characters
    tracemalloc.start()
    start = time.process_time()  # CPU time: a busy machine's other jobs do not count (wall time failed under load)
    try:
        with pytest.raises(gr.Error, match="its YAML aliases expand it past"):
            _load_into_editor(path, MAX_SEGMENTS, check_rows=True)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.process_time() - start < 2 and peak < 4 * 2**20


@pytest.mark.parametrize("segments, message", [
    ([{"text": "a cat"}] * (MAX_SEGMENTS + 1), rf"storyboard has {MAX_SEGMENTS + 1} segments"),
    ([{"text": "a cat " * 200}], r"row 1 text: 1199 characters; the limit is 1000"),
], ids=["too-many-rows", "long-text"])
def test_an_upload_gets_the_limits_of_typed_rows(tmp_path, segments, message):
    import json

    import gradio as gr

    from pipeline.demo.page import _load_into_editor

    path = tmp_path / "story.json"
    path.write_text(json.dumps({"scenes": [{"segments": segments}]}))
    _load_into_editor(path)  # the bundled examples are loaded without the editor's limits
    with pytest.raises(gr.Error, match=message):
        _load_into_editor(path, MAX_SEGMENTS, check_rows=True)


# the editor's helpers


def test_rows_round_trip_every_example_storyboard():
    for path in sorted((ROOT / "examples").glob("*")):
        storyboard = load_storyboard(path, max_segments=None)
        again = storyboard_from_rows(rows_from_storyboard(storyboard), storyboard.title, storyboard.negative_text,
                                     max_segments=None)
        # what the pipeline sees; an empty negative text and none are the same to it
        assert again.title == storyboard.title and again.texts == storyboard.texts, path.name
        assert [s.scene_start for s in again.segments] == [s.scene_start for s in storyboard.segments], path.name
        assert again.negative_texts() == storyboard.negative_texts(), path.name


def test_rows_to_storyboard_rules():
    storyboard = storyboard_from_rows([[" a cat ", True, ""], ["a dog", "true", " dark "], ["", False, ""],
                                       [None, None, None]], title=" T ", negative_text="")
    assert storyboard.texts == ["a cat", "a dog"]  # trimmed; blank rows at the end dropped
    assert [s.scene_start for s in storyboard.segments] == [False, True]  # nothing to cut from on row 1
    assert [s.negative_text for s in storyboard.segments] == [None, "dark"]
    assert (storyboard.title, storyboard.negative_text) == ("T", None)

    with pytest.raises(StoryboardError) as error:
        storyboard_from_rows([["a cat", False, ""], ["", False, "dark"], ["", False, ""], ["a dog", False, ""]],
                             max_segments=2)
    assert error.value.problems == [
        "row 2: no text; write what happens in this segment, or remove the row",
        "row 3: no text; write what happens in this segment, or remove the row",
        "storyboard has 4 segments (12 s); the maximum is 2 (6 s) — raise max_segments to allow more",
    ]
    with pytest.raises(StoryboardError, match="the storyboard is empty"):
        storyboard_from_rows([["", False, ""]])
    with pytest.raises(StoryboardError, match="row 1 text: 6 characters; the limit is 5"):
        storyboard_from_rows([["abcdef", False, ""]], max_text_chars=5)


def test_the_guidance_slider_starts_at_the_models_own_scale(tmp_path):
    import gradio as gr
    from tiny_ttt_pipeline import tiny_ttt_pipeline

    from pipeline.demo import build_demo

    pipe = tiny_ttt_pipeline()
    pipe.register_to_config(guidance_scale=2.5)  # as a pipeline saved with guidance_scale 2.5 loads
    demo = build_demo(pipe, output_dir=tmp_path)
    sliders = {b.label: b.value for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    assert sliders["Guidance"] == 2.5


def test_the_memory_guidance_slider_shows_only_for_a_model_with_ttt_and_starts_at_its_own(tmp_path):
    import gradio as gr
    from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, tiny_components
    from tiny_ttt_pipeline import tiny_ttt_pipeline

    from models import CogVideoXTTTTransformer3DModel
    from pipeline.demo import build_demo
    from pipeline.pipeline_ttt_video import TTTVideoPipeline

    components = tiny_components()
    components["transformer"] = CogVideoXTTTTransformer3DModel.from_base(
        components["transformer"], ttt_type="none", latent_frames_first=FRAMES_FIRST,
        latent_frames_per_segment=FRAMES_PER_SEGMENT)
    for pipe, shown in ((tiny_ttt_pipeline(), True), (TTTVideoPipeline(**components), False)):
        demo = build_demo(pipe, output_dir=tmp_path)
        memory = [b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label == "Memory guidance"]
        assert len(memory) == 1 and memory[0].value == 0 and memory[0].visible is shown
        assert memory[0].info.startswith("Push every segment toward")
    own = tiny_ttt_pipeline()  # a model with memory guidance of its own: the slider starts there and says where
    own.register_to_config(memory_guidance_scale=3.0, memory_guidance_segments="continuing")
    memory = [b for b in build_demo(own, output_dir=tmp_path).blocks.values()
              if isinstance(b, gr.Slider) and b.label == "Memory guidance"]
    assert memory[0].value == 3.0 and memory[0].info.startswith("Push every segment that continues a scene toward")


def test_a_models_own_memory_guidance_above_the_demos_range_is_taken_and_reachable(tmp_path):
    """A model saved with a memory guidance scale above MAX_MEMORY_GUIDANCE: the slider reaches it and starts there,
    and the renderer takes it as the default setting (it refused it once: the demo could not render at all)."""
    import gradio as gr
    from tiny_ttt_pipeline import tiny_ttt_pipeline

    from pipeline.demo import build_demo
    from pipeline.demo.worker import MAX_MEMORY_GUIDANCE, Renderer, Settings, SettingsError

    pipe = tiny_ttt_pipeline()
    own = MAX_MEMORY_GUIDANCE + 10
    pipe.register_to_config(memory_guidance_scale=own)
    memory = [b for b in build_demo(pipe, output_dir=tmp_path).blocks.values()
              if isinstance(b, gr.Slider) and b.label == "Memory guidance"]
    assert memory[0].maximum == own and memory[0].value == own
    renderer = Renderer(pipe, OutputFolders(tmp_path / "outputs"))
    assert renderer.resolved(Settings()).memory_guidance == own
    with pytest.raises(SettingsError, match=f"memory_guidance: expected a number from 0 \\(off\\) to {own:g}, got"):
        renderer.resolved(Settings(memory_guidance=own + 1))
    with pytest.raises(SettingsError, match=f"to {MAX_MEMORY_GUIDANCE:g}, got"):
        Settings(memory_guidance=MAX_MEMORY_GUIDANCE + 1).checked()


def test_summary_counts_segments_seconds_and_scenes():
    rows = [["a", False, ""], ["b", True, ""], ["", False, ""], ["c", True, ""], ["", False, ""]]
    assert storyboard_summary(rows, 21) == "**4 segments · 12 s · 3 scenes** — row 3 without text"
    assert storyboard_summary(rows[:1], 21) == "**1 segment · 3 s · 1 scene**"
    assert storyboard_summary([["a", False, ""]] * 22, 21).endswith("over the limit of 21 segments (1 min 3 s)")
    assert storyboard_summary([], 21) == "**0 segments · 0 s · 0 scenes**"


def test_row_buttons():
    rows = [["a", False, ""], ["b", True, ""], ["c", False, ""]]
    assert edit_table(rows, 0, "add") == ([["a", False, ""], ["", False, "", False], ["b", True, ""], ["c", False, ""]],
                                          1)
    assert edit_table(rows, None, "add") == (rows + [["", False, "", False]], 3)
    assert edit_table(rows, 1, "up") == ([["b", True, ""], ["a", False, ""], ["c", False, ""]], 0)
    assert edit_table(rows, 1, "down") == ([["a", False, ""], ["c", False, ""], ["b", True, ""]], 2)
    assert edit_table(rows, 0, "up") == (rows, 0)
    assert edit_table(rows, 2, "down") == (rows, 2)
    assert edit_table(rows, 2, "remove") == (rows[:2], 1)
    assert edit_table(rows, None, "remove") == (rows, None)
    assert edit_table(rows, 7, "up") == (rows, None)  # a stale selection does nothing
    assert edit_table(rows[:1], 0, "remove") == ([["", False, "", False]], None)
    assert edit_table(rows, 1, "clear") == ([["", False, "", False]], None)
    with pytest.raises(ValueError, match="action"):
        edit_table(rows, 0, "sort")


def test_output_folders_keep_the_newest(tmp_path):
    (tmp_path / "mine").mkdir()
    outputs = OutputFolders(tmp_path, keep=3)
    made = [outputs.new() for _ in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mine"] + [p.name for p in made[-3:]])
    with pytest.raises(ValueError, match="keep"):
        OutputFolders(tmp_path, keep=0)


def test_latent_preview_against_a_per_pixel_reference():
    torch.manual_seed(0)
    first, per_segment, channels = 3, 2, 5
    latents = torch.randn(1, first + 2 * per_segment, channels, 2, 3)  # 3 segments
    sheet = latent_preview(latents, first, per_segment, height=4, columns=2)
    assert sheet.dtype == np.uint8 and sheet.shape == (2 * 4 + 2, 2 * 6 + 2, 3)  # 2 rows of 2 tiles, 2-pixel gaps

    x = latents[0].double()
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    middle_frames = [1, 3, 5]  # frames [0, 3), [3, 5), [5, 7)
    for tile, frame in enumerate(middle_frames):
        for i in range(2):
            for j in range(3):
                rgb = []
                for k in range(3):  # colour k: sum over channels of the normalised value times cos(hue_c - k 2pi/3)
                    value = sum((x[frame, c, i, j] - mean[c]) / std[c]
                                * np.cos(2 * np.pi * c / channels - k * 2 * np.pi / 3) for c in range(channels))
                    rgb.append(round(255 * min(max(0.5 + 0.25 * float(value) / np.sqrt(channels / 2), 0), 1)))
                row, col = divmod(tile, 2)
                top, left = row * 6 + 2 * i, col * 8 + 2 * j  # tiles of 4x6 pixels, each latent pixel 2x2
                block = sheet[top:top + 2, left:left + 2].reshape(-1, 3)
                assert (np.abs(block.astype(int) - rgb) <= 1).all(), (tile, i, j)
    assert (sheet[4:6] == 255).all() and (sheet[:, 6:8] == 255).all()  # the gaps
    assert (sheet[6:, 8:] == 255).all()  # no fourth tile


def test_rows_marked_keep_are_kept_in_the_next_generation(client):
    """The latents of kept rows are checked bit for bit in tests/test_app_keep.py; here the page's wiring."""
    from gradio_client.exceptions import AppError

    generate(client, TWO_ROWS, seed=1)
    rows = [TWO_ROWS[0] + [True], TWO_ROWS[1] + [False], ["a bird flies", False, "", False]]
    _, video, _, status = generate(client, rows, seed=2)
    assert "3 segments, keeping rows 1," in status, status
    assert decode(video)[0].shape[0] == expected_num_frames(3)
    with pytest.raises(AppError, match="every row is marked keep: untick the rows to generate anew, or add rows"):
        generate(client, [row[:3] + [True] for row in rows], seed=3)
