"""The ``workshop`` command: run the notebooks, check the machine, start Triton, the endpoint
or the API."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def _notebooks(args: argparse.Namespace) -> int:
    from helpers.settings import get_settings
    from helpers.workshop.notebooks import run_workshop

    settings = get_settings()
    output_dir = Path(args.output_dir) if args.output_dir else settings.work_dir / "notebooks"
    runs = run_workshop(output_dir, parameters={"backend": settings.backend})
    print(f"\n{len(runs)} notebook(s) ran. Executed copies: {output_dir}")
    print(f"Artifacts and local state: {settings.work_dir}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from helpers.settings import get_settings
    from helpers.workshop.environment import render_checks, run_checks

    results = run_checks(get_settings())
    print(render_checks(results))
    return 0 if all(result.ok for result in results) else 1


def _triton(args: argparse.Namespace) -> int:
    from helpers.infra.local.triton_server import serve_forever
    from helpers.settings import get_settings

    settings = get_settings()
    repository = Path(args.model_repository or settings.work_dir / "triton-models")
    repository.mkdir(parents=True, exist_ok=True)
    serve_forever(settings, repository)
    return 0


def _endpoint(args: argparse.Namespace) -> int:
    from helpers.backend import open_backend
    from helpers.infra.local.endpoint import serve_endpoint
    from helpers.settings import get_settings

    settings = get_settings()
    store = open_backend(settings).store
    serve_endpoint(settings, store, max_loaded_models=args.max_loaded_models)
    return 0


def _api(args: argparse.Namespace) -> int:
    import signal
    import threading

    from helpers.api.local import ADMIN_KEY_ENV, LocalApi
    from helpers.settings import get_settings

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = get_settings()
    with LocalApi(
        settings, max_loaded_models=args.max_loaded_models, serving_mode=args.serving_mode
    ) as api:
        print(f"Workshop API ready at {api.url} (interactive docs: {api.url}/docs)")
        print(f"  serving users' models: {api.serving_mode}")
        if api.resumed:
            print(f"  resumed onboarding of {api.resumed} model(s) left unfinished")
        print(
            f"  admin key (creates users): in {api.admin_key_source}; read it from there "
            f"(or set {ADMIN_KEY_ENV})"
        )
        print("Ctrl-C stops it.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="workshop", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("notebooks", help="run every notebook in order with papermill")
    run.add_argument(
        "--output-dir", help="where executed copies go (default: <work_dir>/notebooks)"
    )
    run.set_defaults(handler=_notebooks)
    check = commands.add_parser("check", help="check this machine for the workshop")
    check.set_defaults(handler=_check)
    triton = commands.add_parser("triton", help="run a local Triton server until Ctrl-C")
    triton.add_argument("--model-repository", help="default: <work_dir>/triton-models")
    triton.set_defaults(handler=_triton)
    endpoint = commands.add_parser(
        "endpoint", help="run the local multi-model endpoint (Triton + router) until Ctrl-C"
    )
    endpoint.add_argument(
        "--max-loaded-models", type=int, default=4, help="models loaded at once (default 4)"
    )
    endpoint.set_defaults(handler=_endpoint)
    api = commands.add_parser(
        "api", help="run the SaaS API with its onboarding worker and endpoint until Ctrl-C"
    )
    api.add_argument(
        "--max-loaded-models", type=int, default=4, help="endpoint models loaded at once"
    )
    api.add_argument(
        "--serving-mode",
        choices=["per-user", "shared-base"],
        default="per-user",
        help="one Triton model per user model, or one shared base with adapters",
    )
    api.set_defaults(handler=_api)
    return parser.parse_args(input_args)


def main(input_args: list[str] | None = None) -> int:
    from helpers.settings import SettingsError

    args = parse_args(input_args)
    try:
        return args.handler(args)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
