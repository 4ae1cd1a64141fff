"""The AWS CDK app of the workshop's `sagemaker` backend: one stack of a few constructs.

`storage` (bucket, table), `sagemaker_role`, `serving_image` (the endpoint's image, built in
CodeBuild), `endpoint` (the multi-model endpoint), `scaling` (its autoscaling), `workflow`
(onboarding on Step Functions and the packaging function), `api` (API Gateway and the API
function), `monitoring` (the dashboard and alarms); `bundling` builds the functions' code without
Docker and `nag` holds cdk-nag's checks and acknowledgments.
"""

from workshop_infra.nag import add_nag_checks
from workshop_infra.props import WorkshopProps
from workshop_infra.stack import WorkshopStack

__all__ = ["WorkshopProps", "WorkshopStack", "add_nag_checks"]
