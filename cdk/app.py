#!/usr/bin/env python3
"""Synthesize the workshop's stack into `cdk/cdk.out/`, offline and without Docker.

    python app.py                              # context from cdk.json
    python app.py -c workshop:bundle=false     # fast: no pip install (tests; not deployable)
    npx aws-cdk synth / deploy                 # the same through the CDK CLI

Props are context values `workshop:<name>` (see `workshop_infra.props.WorkshopProps`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from workshop_infra import WorkshopProps, WorkshopStack, add_nag_checks

HERE = Path(__file__).resolve().parent
DEFAULT_STACK_NAME = "PersonalizedGenAiWorkshop"


def build_app(context: Mapping[str, Any] | None = None, outdir: str | None = None) -> cdk.App:
    """The app with the workshop's stack and cdk-nag's AwsSolutions checks.

    Args:
        context (`Mapping[str, Any]`, *optional*): context values (`workshop:<prop>`,
            `workshop:stack_name`); under the CDK CLI it passes them itself.
        outdir (`str`, *optional*): where to synthesize; the CLI's choice or a temporary
            folder when None.
    """
    app = cdk.App(context=dict(context or {}), outdir=outdir)
    props = WorkshopProps.from_context(app.node.try_get_context)
    stack_name = app.node.try_get_context("workshop:stack_name") or DEFAULT_STACK_NAME
    WorkshopStack(
        app,
        stack_name,
        props=props,
        description="Personalized generative AI as a SaaS: the workshop's sagemaker backend",
    )
    add_nag_checks(app)
    return app


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c",
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a context value, as with `cdk synth -c` (repeatable)",
    )
    args = parser.parse_args(input_args)
    for item in args.context:
        if "=" not in item:
            parser.error(f"--context takes KEY=VALUE, got {item!r}")
    return args


def main(args: argparse.Namespace) -> None:
    if "CDK_OUTDIR" in os.environ:  # run by the CDK CLI: it passes context and outdir
        build_app().synth()
        return
    context = json.loads((HERE / "cdk.json").read_text()).get("context", {})
    context.update(item.split("=", 1) for item in args.context)
    build_app(context, outdir=str(HERE / "cdk.out")).synth()


if __name__ == "__main__":
    main(parse_args())
