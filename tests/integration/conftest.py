"""Shared integration fixtures: a real S3-protocol server (moto's server mode) on loopback."""

from __future__ import annotations

import os

import boto3
import pytest


@pytest.fixture(scope="module")
def s3_moto():
    """A moto S3 server on 127.0.0.1 (a free port) that records the requests it serves
    (``bench._common.CountingS3Server``), and the AWS variables pointing at it."""
    from bench._common import CountingS3Server

    server = CountingS3Server()
    env = {"AWS_ENDPOINT_URL_S3": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="module")
def s3_server(s3_moto):
    """A boto3 S3 client of the module's moto server."""
    return boto3.client("s3", endpoint_url=s3_moto.endpoint)
