"""The TTT-Video demo in the browser: edit a storyboard, press Generate, watch it denoise, download the video.

    python app.py                                       # the default model (models/default/) on http://127.0.0.1:7860
    python app.py --model path/to/pipeline --port 8080 --share

--model is a pipeline saved with TTTVideoPipeline.save_pretrained (a directory or hub id). The page and its controls:
docs/demo.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from pipeline.loading import (
    DTYPES,
    ArgumentParser,
    InputError,
    UsageError,
    check_model_path,
    default_model,
    first_line,
    fit_cpu_threads,
    load_pipeline,
    resolve_device,
)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="The TTT-Video demo: storyboard in, video out, in the browser.")
    p.add_argument("--model", default=None, help="pipeline directory or hub id; default: models/default/")
    p.add_argument("--server-name", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument("--max-segments", type=int, default=21, help="most segments per storyboard (default 21 = 63 s)")
    p.add_argument("--max-queue", type=int, default=16, help="most requests waiting in line (default 16)")
    p.add_argument("--steps", type=int, default=50, help="the page's default number of denoising steps")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where results are written (the newest 8 are kept); default: a new temporary folder")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU, each moved to the GPU in turn")
    args = p.parse_args(argv)
    for flag, value in (("--max-segments", args.max_segments), ("--max-queue", args.max_queue),
                        ("--steps", args.steps)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {args.port}")
    return args


def check_port(host: str, port: int) -> None:
    """Binds host:port and lets go, so that a port in use is one line before the model is loaded (the server binds
    the same way: SO_REUSEADDR, so a port left in TIME_WAIT by a previous run is not taken for one in use)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--server-name {host}: not an address to listen on ({e.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            reason = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({reason}); pick another --port") from None


def main(argv: list[str] | None = None, prevent_thread_lock: bool = False):
    """Starts the app; returns the running gr.Blocks when prevent_thread_lock (tests), else serves until stopped."""
    # 1. flags and model location (cheap checks before anything heavy is imported)
    args = parse_args(argv)
    args.model = args.model or default_model()
    check_model_path(args.model)  # a local folder must hold a pipeline; "owner/name" may be a hub id
    check_port(args.server_name, args.port)
    device, dtype = resolve_device(args.device, args.dtype, args.offload)
    from pipeline.demo import MAX_STEPS, build_demo, launch

    if args.steps > MAX_STEPS:
        raise UsageError(f"--steps must be at most {MAX_STEPS}, got {args.steps}")

    # 2. load the pipeline and build the app around it
    try:
        pipe = load_pipeline(args.model, None, dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load --model {args.model}: {first_line(e)}") from None
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if device.type == "cpu" and (threads := fit_cpu_threads()):
        print(f"app.py: other jobs keep cores busy; sampling on {threads} thread(s) (OMP_NUM_THREADS chooses)",
              file=sys.stderr)
    demo = build_demo(pipe, max_segments=args.max_segments, max_queue=args.max_queue, output_dir=args.output_dir,
                      default_steps=args.steps)

    # 3. serve
    try:
        launch(demo, server_name=args.server_name, server_port=args.port, share=args.share,
               prevent_thread_lock=prevent_thread_lock,
               allowed_paths=[str(args.output_dir)] if args.output_dir else None)
    except OSError as e:  # the port taken since check_port, say
        raise InputError(f"cannot serve on {args.server_name}:{args.port}: {first_line(e)}") from None
    return demo


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except InputError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        sys.exit(1)
