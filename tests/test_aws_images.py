"""AWS's deep learning container images: the region -> account table and the ECR domains."""

from __future__ import annotations

import re

import pytest

from helpers.infra.aws.images import (
    COMMERCIAL_ACCOUNT,
    DLC_ACCOUNTS,
    HUGGINGFACE_TRAINING_REGIONS,
    TRITON_REGIONS,
    dlc_image_uri,
    ecr_domain,
)

IMAGE = "{account}.dkr.ecr.{region}.{domain}/some-image:1.0"


@pytest.mark.parametrize(
    ("region", "expected"),
    [
        ("us-east-1", f"{COMMERCIAL_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/some-image:1.0"),
        ("eu-south-1", "692866216735.dkr.ecr.eu-south-1.amazonaws.com/some-image:1.0"),
        ("af-south-1", "626614931356.dkr.ecr.af-south-1.amazonaws.com/some-image:1.0"),
        ("ap-east-1", "871362719292.dkr.ecr.ap-east-1.amazonaws.com/some-image:1.0"),
        ("me-south-1", "217643126080.dkr.ecr.me-south-1.amazonaws.com/some-image:1.0"),
        ("cn-north-1", "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/some-image:1.0"),
        ("us-gov-west-1", "442386744353.dkr.ecr.us-gov-west-1.amazonaws.com/some-image:1.0"),
        ("us-iso-east-1", "886529160074.dkr.ecr.us-iso-east-1.c2s.ic.gov/some-image:1.0"),
    ],
)
def test_an_image_comes_from_its_regions_dlc_account_and_partition_domain(region, expected):
    assert dlc_image_uri(region, IMAGE) == expected


def test_every_region_has_a_twelve_digit_account_and_the_partition_botocore_knows():
    from botocore.loaders import create_loader

    partitions = create_loader().load_data("endpoints")["partitions"]
    for region, account in DLC_ACCOUNTS.items():
        assert re.fullmatch(r"\d{12}", account), region
        suffixes = [p["dnsSuffix"] for p in partitions if re.match(p["regionRegex"], region)]
        assert suffixes == [ecr_domain(region)], region
    assert set(TRITON_REGIONS) < set(DLC_ACCOUNTS)
    assert set(HUGGINGFACE_TRAINING_REGIONS) < set(DLC_ACCOUNTS)


def test_a_region_without_the_image_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(ValueError, match="'xx-nowhere-1'") as caught:
        dlc_image_uri("xx-nowhere-1", IMAGE)
    assert "us-east-1" in str(caught.value) and "cn-north-1" in str(caught.value)
    with pytest.raises(ValueError, match=r"some-image:1\.0 for region 'us-gov-west-1'") as caught:
        dlc_image_uri("us-gov-west-1", IMAGE, TRITON_REGIONS)
    assert "us-gov" not in str(caught.value).split("supported regions:")[1]


def test_a_cdk_token_region_and_an_image_of_your_own_are_only_formatted():
    token = "${Token[AWS.Region.9]}"
    assert dlc_image_uri(token, IMAGE) == (
        f"{COMMERCIAL_ACCOUNT}.dkr.ecr.{token}.amazonaws.com/some-image:1.0"
    )
    own = "123456789012.dkr.ecr.{region}.{domain}/mine:1"
    in_china = "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/mine:1"
    assert dlc_image_uri("cn-north-1", own) == in_china
    assert dlc_image_uri("xx-nowhere-1", own).startswith("123456789012.dkr.ecr.xx-nowhere-1.")
