"""
A web page that translates SAR images into optical images.

    python scripts/app.py

starts it on http://127.0.0.1:7860 and prints the address. Upload a SAR image
(PNG, TIFF or GeoTIFF) or click an example; choose the model, the sampler, the
steps, the seed and the samples. An image at the model's size is translated
exactly as scripts/image_sample_realtime.py translates a file of the same name,
any other size exactly as scripts/translate_scene.py translates it (in
overlapping tiles); the page shows the equivalent command. Downloads: PNG, and
GeoTIFF with the input's georeference when it had one. With Samples K above 1
(--samples_per_input K) the page also shows the K samples' mean and a picture of
their spread, and offers their files.

Without --model_path or --runs_dir the page offers the small model bundled in
assets/scene_model/ (trained on generated scenes; VV and VH in dB), its distilled
student in assets/scene_student/ (2 network calls instead of 20) and the
generated examples in assets/examples/. The files are read as the model's
training run read its data (its config.json). Requests queue and run one at a
time; the last two models used stay loaded; Cancel stops the user's request at its
next network call.

On a machine a lab shares (--host 0.0.0.0), each request is limited: its upload's
size, its pixels, its samples x steps and its seconds (the flags below, their
defaults stated); a refusal gives the scripts/translate_scene.py command that does
the same without limits. --auth USER:PASS (or --auth_file) makes the page ask for a
password; without it, serving beyond 127.0.0.1 logs who can reach the page.

Needs the "app" extra: pip install -e '.[app]'.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion.page.app import (  # noqa: E402
    CACHE_SIZE,
    EXAMPLES_DIR,
    MAX_PIXELS_CPU,
    MAX_PIXELS_GPU,
    MAX_SAMPLE_STEPS,
    MAX_SECONDS,
    MAX_UPLOAD_MB,
    MAX_WORK_GB,
    Limits,
    PageError,
    Translator,
    build_page,
    find_examples,
    find_models,
    launch,
)


def create_argparser():
    """The page's flags."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to serve on (0.0.0.0: every interface of "
                             "this machine; there is no public share link)")  # fmt: skip
    parser.add_argument("--port", type=int, default=7860, help="the port to serve on")
    parser.add_argument("--model_path", action="append", default=[],
                        help="a model or EMA file of a training run (its config.json "
                             "beside it); repeat for several; listed by run name")  # fmt: skip
    parser.add_argument("--runs_dir", default=None,
                        help="a folder of training runs (logs/): each run's newest "
                             "EMA (else model) checkpoint is offered")  # fmt: skip
    parser.add_argument("--examples", action="append", default=[],
                        help="a folder of your own SAR files offered as examples "
                             "(repeatable), after the bundled ones")  # fmt: skip
    parser.add_argument("--no_bundled", action="store_true",
                        help="leave the bundled demo model and its examples out "
                             "(only with --model_path or --runs_dir)")  # fmt: skip
    parser.add_argument(
        "--cache_size",
        type=int,
        default=CACHE_SIZE,
        help="models kept loaded at once (the last used)",
    )
    parser.add_argument("--work_dir", default=None,
                        help="where the results of requests are kept for download "
                             "(default: a new temporary folder)")  # fmt: skip
    limits = parser.add_argument_group("limits per request (for a page others use)")
    limits.add_argument(
        "--max_upload_mb",
        type=float,
        default=MAX_UPLOAD_MB,
        help="the largest upload, in MB of 2**20 bytes as Gradio counts them "
        f"(default {MAX_UPLOAD_MB})",
    )
    limits.add_argument("--max_pixels", type=int, default=None,
                        help="the most pixels of an image the page translates (default "
                             f"{MAX_PIXELS_GPU:,} on a GPU, {MAX_PIXELS_CPU:,} on a CPU: "
                             "minutes per request, not hours)")  # fmt: skip
    limits.add_argument("--max_sample_steps", type=int, default=MAX_SAMPLE_STEPS,
                        help="the most samples x steps per request (default "
                             f"{MAX_SAMPLE_STEPS})")  # fmt: skip
    limits.add_argument("--max_seconds", type=float, default=MAX_SECONDS,
                        help="a request running longer, or on its way to, is stopped "
                             f"(default {MAX_SECONDS})")  # fmt: skip
    limits.add_argument("--max_work_gb", type=float, default=MAX_WORK_GB,
                        help="the most GB the work folder keeps: the oldest requests' "
                             f"files go first (default {MAX_WORK_GB:g})")  # fmt: skip
    access = parser.add_argument_group("who may use the page")
    access.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                        help="ask for this user name and password (Gradio's login); "
                             "repeat for several users. Other users of this machine "
                             "see command lines: --auth_file keeps it off them")  # fmt: skip
    access.add_argument(
        "--auth_file", default=None, help="a file of USER:PASS lines, one per user"
    )
    return parser


def read_auth(args, parser):
    """The (user, password) pairs of --auth and --auth_file, or None."""
    lines = [("--auth", a) for a in args.auth]
    if args.auth_file:
        try:
            with open(args.auth_file) as f:
                lines += [(f"--auth_file {args.auth_file}", line.strip())
                          for line in f if line.strip() and not line.startswith("#")]  # fmt: skip
        except OSError as err:
            parser.error(f"--auth_file {args.auth_file}: {err.strerror or err}")
    pairs = []
    for where, line in lines:
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            parser.error(
                f"{where}: give USER:PASS, a user name and a password after a colon"
            )
        pairs.append((user, password))
    if args.auth_file and not pairs:
        parser.error(f"--auth_file {args.auth_file}: no USER:PASS line in it")
    return pairs or None


def parse_args(argv=None):
    """The checked flags."""
    parser = create_argparser()
    args = parser.parse_args(argv)
    if args.no_bundled and not (args.model_path or args.runs_dir):
        parser.error("--no_bundled needs --model_path or --runs_dir: a model to offer")
    if args.cache_size < 1:
        parser.error("--cache_size must be 1 or more")
    for flag in ("max_upload_mb", "max_pixels", "max_sample_steps", "max_seconds",
                 "max_work_gb"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag} {value:g}: give a number above 0")
    args.auth = read_auth(args, parser)
    args.limits = Limits(
        upload_mb=args.max_upload_mb, pixels=args.max_pixels,
        sample_steps=args.max_sample_steps, seconds=args.max_seconds,
        work_gb=args.max_work_gb,
    )  # fmt: skip
    return args


def main():
    args = parse_args()
    models = find_models(args.model_path, args.runs_dir, bundled=not args.no_bundled)
    bundled = (
        [] if args.no_bundled or not os.path.isdir(EXAMPLES_DIR) else [EXAMPLES_DIR]
    )
    examples = find_examples(bundled + args.examples)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise PageError(
            "the page needs Gradio: pip install -e '.[app]' (from the repository)"
        ) from None
    # what the scripts do at their defaults (IEEE float32, no TF32); uploads come in
    # any size, so cuDNN's search per new shape would cost more than it saves
    dist_util.configure_numerics(use_tf32=False, cudnn_benchmark=False)
    translator = Translator(
        models, work_dir=args.work_dir, cache_size=args.cache_size, limits=args.limits
    )
    page = build_page(translator, examples)
    url = launch(
        page, translator, examples, host=args.host, port=args.port, auth=args.auth
    )
    for name, path in models.items():
        print(f"model {name}: {path}", flush=True)
    print(f"limits per request: {translator.limits.describe()}", flush=True)
    print(f"The page is at {url}  (Ctrl-C stops it)", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()


if __name__ == "__main__":
    try:
        main()
    except PageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
