"""``python -m helpers.workshop.basemodel``: rebuild the committed base model
(``make base-model``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from helpers.settings import DEFAULT_BASE_MODEL
from helpers.workshop.basemodel.pretrain import BuildConfig, build_base_model, rescore_base_model


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output",
        default=str(DEFAULT_BASE_MODEL),
        help="pipeline directory to write (default: %(default)s)",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="only re-measure prompt following of the model in --output",
    )
    for spec in fields(BuildConfig):
        flag = "--" + spec.name.replace("_", "-")
        parser.add_argument(
            flag, type=type(spec.default), default=spec.default, help=f"default: {spec.default}"
        )
    return parser.parse_args(input_args)


def main(args: argparse.Namespace) -> None:
    config = BuildConfig(**{spec.name: getattr(args, spec.name) for spec in fields(BuildConfig)})
    if args.rescore:
        report = rescore_base_model(args.output, per_prompt=config.eval_per_prompt)
    else:
        report = build_base_model(args.output, config)
    summary = {key: value for key, value in report.items() if key != "weights_sha256"}
    summary.get("prompt_following", {}).pop("per_prompt", None)
    print(json.dumps(summary, indent=2))
    print(f"base model: {args.output}")


if __name__ == "__main__":
    main(parse_args())
