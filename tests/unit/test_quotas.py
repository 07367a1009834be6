"""A start is refused when the account cannot run workers + 1 trainer executions at once."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from localrun import environment, lambda_api
from trainer import quotas
from trainer.errors import InvalidEventError


@pytest.fixture
def lambda_client():
    return boto3.client(
        "lambda", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def account_settings(limit: int, unreserved: int) -> dict:
    return {"AccountLimit": {"ConcurrentExecutions": limit, "UnreservedConcurrentExecutions": unreserved}}


def test_start_fits_when_unreserved_concurrency_covers_workers_and_the_combiner(lambda_client):
    with Stubber(lambda_client) as stubber:
        stubber.add_response("get_account_settings", account_settings(1000, 7))

        quotas.check_concurrency(lambda_client, workers=6)

        stubber.assert_no_pending_responses()


def test_start_is_refused_with_the_numbers_and_the_quota_to_request(lambda_client):
    with Stubber(lambda_client) as stubber:
        stubber.add_response("get_account_settings", account_settings(10, 10))

        with pytest.raises(InvalidEventError) as excinfo:
            quotas.check_concurrency(lambda_client, workers=12)

    message = str(excinfo.value)
    assert "workers 12 needs 13 concurrent executions" in message
    assert "unreserved concurrency is 10 (limit 10, 0 reserved by other functions)" in message
    assert (
        "ask for at least 13 in Service Quotas (AWS Lambda, 'Concurrent executions', L-B99A9384)" in message
    )
    assert "workers <= 9" in message


def test_concurrency_reserved_by_other_functions_raises_the_quota_to_ask_for(lambda_client):
    with Stubber(lambda_client) as stubber:
        stubber.add_response("get_account_settings", account_settings(1000, 100))

        with pytest.raises(InvalidEventError, match="ask for at least 1101 in Service Quotas"):
            quotas.check_concurrency(lambda_client, workers=200)


def test_the_trainers_own_reservation_is_its_limit_without_asking_the_account(lambda_client):
    with Stubber(lambda_client):  # no response queued: any call would fail
        quotas.check_concurrency(lambda_client, workers=6, reserved=7)

        with pytest.raises(
            InvalidEventError, match="reserved concurrency is 7; redeploy with ReservedConcurrency=9"
        ):
            quotas.check_concurrency(lambda_client, workers=8, reserved=7)


def test_more_reducers_than_workers_need_as_many_executions(lambda_client):
    with Stubber(lambda_client):
        quotas.check_concurrency(lambda_client, workers=4, reserved=9, reducers=8)

        with pytest.raises(InvalidEventError, match="reducers 9 needs 10 concurrent executions"):
            quotas.check_concurrency(lambda_client, workers=4, reserved=9, reducers=9)


def test_access_denied_is_not_mistaken_for_a_missing_api(lambda_client):
    from botocore.exceptions import ClientError

    with Stubber(lambda_client) as stubber:
        stubber.add_client_error("get_account_settings", "AccessDeniedException", http_status_code=403)

        with pytest.raises(ClientError, match="AccessDeniedException"):
            quotas.check_concurrency(lambda_client, workers=1)


def test_check_is_skipped_against_the_local_invoke_api(caplog):
    # The local runtime implements Invoke only; GetAccountSettings must not fail a local run.
    with lambda_api.LambdaApiServer([]) as api:
        client = boto3.client(
            "lambda",
            config=Config(retries={"max_attempts": 1}),
            **environment.client_settings(api.endpoint_url),
        )
        with caplog.at_level("INFO", logger="trainer.quotas"):
            quotas.check_concurrency(client, workers=256)

    messages = [record.getMessage() for record in caplog.records if record.name == "trainer.quotas"]
    assert messages == ["concurrency_check_skipped"]
