"""AWS's Deep Learning Container (DLC) images: which account serves them in which region.

SageMaker's prebuilt framework images (the Triton serving image, the Hugging Face training
image, ...) sit in ECR repositories of an AWS-owned account that depends on the region:
763104351884 in the regions that were open to every account from the start, another account in
each opt-in region (af-south-1, ap-east-1, eu-south-1, me-south-1, ...), and others again in
China, GovCloud and the isolated partitions. The registry's domain follows the partition:
`amazonaws.com.cn` in China, for instance. So an image URI is

    <DLC_ACCOUNTS[region]>.dkr.ecr.<region>.<ecr_domain(region)>/<repository>:<tag>

Neither table is fetched at run time: the SageMaker Python SDK that ships them is not a
dependency (DESIGN.md), and the CDK app imports this module offline.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = [
    "COMMERCIAL_ACCOUNT",
    "DLC_ACCOUNTS",
    "HUGGINGFACE_TRAINING_REGIONS",
    "TRITON_REGIONS",
    "dlc_image_uri",
    "ecr_domain",
]

#: The DLC account of the regions open to every account by default.
COMMERCIAL_ACCOUNT = "763104351884"

# Checked against the SageMaker Python SDK's image URI tables (github.com/aws/sagemaker-python-sdk):
# sagemaker-core/src/sagemaker/core/image_uri_config/sagemaker-tritonserver.json (version
# "25.04", commit 3203e49) and sagemaker-core/src/sagemaker/core/image_uri_config/huggingface.json
# (training "4.56.2" / "pytorch2.8.0", commit fef4571). Where both files list a region they give
# the same account; the older src/sagemaker/image_uri_config/sagemaker-tritonserver.json agrees
# for the regions it lists.
#: Region -> the AWS account that serves the deep learning container images there.
DLC_ACCOUNTS: dict[str, str] = {
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-east-2": "975050140332",
    "ap-northeast-1": COMMERCIAL_ACCOUNT,
    "ap-northeast-2": COMMERCIAL_ACCOUNT,
    "ap-northeast-3": "364406365360",
    "ap-south-1": COMMERCIAL_ACCOUNT,
    "ap-south-2": "772153158452",
    "ap-southeast-1": COMMERCIAL_ACCOUNT,
    "ap-southeast-2": COMMERCIAL_ACCOUNT,
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462",
    "ap-southeast-7": "590183813437",
    "ca-central-1": COMMERCIAL_ACCOUNT,
    "ca-west-1": "204538143572",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
    "eu-central-1": COMMERCIAL_ACCOUNT,
    "eu-central-2": "380420809688",
    "eu-north-1": COMMERCIAL_ACCOUNT,
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "eu-west-1": COMMERCIAL_ACCOUNT,
    "eu-west-2": COMMERCIAL_ACCOUNT,
    "eu-west-3": COMMERCIAL_ACCOUNT,
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "me-south-1": "217643126080",
    "mx-central-1": "637423239942",
    "sa-east-1": COMMERCIAL_ACCOUNT,
    "us-east-1": COMMERCIAL_ACCOUNT,
    "us-east-2": COMMERCIAL_ACCOUNT,
    "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353",
    "us-iso-east-1": "886529160074",
    "us-isob-east-1": "094389454867",
    "us-west-1": COMMERCIAL_ACCOUNT,
    "us-west-2": COMMERCIAL_ACCOUNT,
}

#: Where the SDK lists the `sagemaker-tritonserver` image (25.04): not GovCloud or ISO.
TRITON_REGIONS = frozenset(DLC_ACCOUNTS) - {
    "us-gov-east-1",
    "us-gov-west-1",
    "us-iso-east-1",
    "us-isob-east-1",
}
#: Where the SDK lists `huggingface-pytorch-training` 4.56.2 (PyTorch 2.8): not in the newest
#: opt-in regions.
HUGGINGFACE_TRAINING_REGIONS = frozenset(DLC_ACCOUNTS) - {
    "ap-east-2",
    "ap-south-2",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-7",
    "eu-central-2",
    "eu-south-2",
    "mx-central-1",
}

#: Region prefix -> the partition's domain (botocore's endpoints.json `dnsSuffix`), most
#: specific first; every other region is in `amazonaws.com` (aws and aws-us-gov).
_DOMAINS = (
    ("cn-", "amazonaws.com.cn"),
    ("us-isob-", "sc2s.sgov.gov"),
    ("us-iso-", "c2s.ic.gov"),
)


def ecr_domain(region: str) -> str:
    """The domain of ECR in `region`'s partition (`amazonaws.com.cn` in China)."""
    for prefix, domain in _DOMAINS:
        if region.startswith(prefix):
            return domain
    return "amazonaws.com"


def _is_deploy_time(region: str) -> bool:
    """Whether `region` is a CDK token (`Aws.REGION`), known only when CloudFormation runs."""
    return region.startswith("${Token[")


def dlc_image_uri(region: str, image: str, regions: Collection[str] | None = None) -> str:
    """`image` for `region`: a template with `{account}`, `{region}` and `{domain}` filled in.

    Args:
        region (`str`): the AWS region, e.g. `"eu-west-1"`. A CDK token (`Aws.REGION`) gets
            the commercial account and domain: a stack for another partition or an opt-in
            region needs a concrete region.
        image (`str`): a template, e.g. `"{account}.dkr.ecr.{region}.{domain}/<repo>:<tag>"`;
            one without `{account}` (an image of your own) is only formatted.
        regions (`Collection[str]`, *optional*): where this image is published; every region of
            `DLC_ACCOUNTS` when not given.

    Raises:
        ValueError: naming the region and the supported ones, when the image is not there.
    """
    if "{account}" not in image:
        return image.format(region=region, domain=ecr_domain(region))
    if _is_deploy_time(region):
        return image.format(account=COMMERCIAL_ACCOUNT, region=region, domain="amazonaws.com")
    supported = DLC_ACCOUNTS.keys() if regions is None else regions
    if region not in supported:
        repository = image.rsplit("/", 1)[-1]
        raise ValueError(
            f"no AWS deep learning container image {repository} for region {region!r}; "
            f"supported regions: {', '.join(sorted(supported))} (or pass an image URI)"
        )
    return image.format(account=DLC_ACCOUNTS[region], region=region, domain=ecr_domain(region))
