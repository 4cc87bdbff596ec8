"""The demo app (app.py) started in this process on a free local port, for the app and browser tests.

It serves the tiny TTT pipeline (tests/tiny_ttt_pipeline.py) through app.py's own flags, so the tests cover the
entry point, the Blocks app and the pipeline together.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no network

from tiny_ttt_pipeline import save_tiny_ttt_pipeline  # noqa: E402

COLUMNS = ["text", "new scene", "negative text"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(root: Path, *flags: str) -> Iterator[str]:
    """Saves the tiny pipeline under root, starts `app.py --model <it> <flags>` and yields the app's URL.

    On the CPU (float32) even where a GPU is present; results go to root/outputs (app.py's --output-dir)."""
    import app

    model = save_tiny_ttt_pipeline(root / "pipeline")
    demo = app.main(["--model", str(model), "--device", "cpu", "--server-name", "127.0.0.1", "--port", str(free_port()),
                     "--output-dir", str(root / "outputs"), *flags], prevent_thread_lock=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


def table(*rows: list) -> dict:
    """A storyboard table as the /generate endpoint takes it (gr.Dataframe's payload)."""
    return {"headers": COLUMNS, "data": [list(row) for row in rows]}
