"""S3-compatible endpoints (MinIO, GCS interop) get checksums only where S3 requires
them: GCS's interop API rejects the CRC headers boto3 >= 1.36 sends by default."""
from __future__ import annotations

from steps.storage import is_aws, s3_client


def test_aws_keeps_the_defaults_and_others_send_checksums_only_when_required(s3_endpoint):
    assert is_aws(None) and is_aws("https://s3.eu-west-1.amazonaws.com")
    assert not is_aws("https://storage.googleapis.com") and not is_aws(s3_endpoint)

    gcs = s3_client("https://storage.googleapis.com").meta.config
    assert (gcs.request_checksum_calculation, gcs.response_checksum_validation) == ("when_required",) * 2
    assert gcs.retries["mode"] == "standard" and gcs.s3["addressing_style"] == "path"
    aws = s3_client("https://s3.eu-west-1.amazonaws.com").meta.config
    assert aws.request_checksum_calculation != "when_required"


def test_a_put_to_a_compatible_endpoint_carries_no_checksum_header(s3_endpoint, bucket):
    client = s3_client(s3_endpoint)
    sent = []
    client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    client.put_object(Bucket=bucket, Key="x.bin", Body=b"payload")
    assert client.get_object(Bucket=bucket, Key="x.bin")["Body"].read() == b"payload"
    [headers] = sent
    assert not [h for h in headers if h.lower().startswith("x-amz-checksum") or h.lower() == "x-amz-sdk-checksum-algorithm"]
