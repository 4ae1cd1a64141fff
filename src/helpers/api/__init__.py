"""The SaaS API: `create_app(ApiServices(...))`; `helpers.api.local` serves it on this machine,
`helpers.lambdas.api_handler` on AWS Lambda."""

from helpers.api.app import ApiServices, create_app

__all__ = ["ApiServices", "create_app"]
