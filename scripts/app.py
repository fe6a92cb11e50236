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
assets/scene_model/ (trained on generated scenes; VV and VH in dB) and the
generated examples in assets/examples/. The files are read as the model's
training run read its data (its config.json). Requests queue and run one at a
time; the last two models used stay loaded.

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
    return parser


def parse_args(argv=None):
    """The checked flags."""
    parser = create_argparser()
    args = parser.parse_args(argv)
    if args.no_bundled and not (args.model_path or args.runs_dir):
        parser.error("--no_bundled needs --model_path or --runs_dir: a model to offer")
    if args.cache_size < 1:
        parser.error("--cache_size must be 1 or more")
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
    translator = Translator(models, work_dir=args.work_dir, cache_size=args.cache_size)
    page = build_page(translator, examples)
    url = launch(page, translator, examples, host=args.host, port=args.port)
    for name, path in models.items():
        print(f"model {name}: {path}", flush=True)
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
