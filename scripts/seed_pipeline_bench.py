"""The seed's pipeline (the AWS serverless design txpipe replaces: API Gateway, three Python
Lambdas chained by Step Functions, S3, DynamoDB, SNS) run against an S3/DynamoDB/SNS endpoint such as moto, for
`scripts/bench-moto`, which compares it with `txpipe bench e2e` on the same server.

What runs is a stand-in for the seed's three Lambdas, making the same AWS calls in the same
order with the same items (the seed's handler code, minus its event logging and the branches
a Step Functions run does not take):

* csv-validator, invoked with the uploaded CSV in its event (as API Gateway hands it over):
  status ``validating`` (PutItem), the schema check, the file stored as ``validated/{id}.csv``
  (S3 PutObject), status ``validated`` (PutItem);
* data-transformer, with the validator's output (Step Functions passes ``$.Payload`` on):
  status ``processing``, S3 GetObject of the file, every row put into the transactions table
  through ``batch_writer()`` (BatchWriteItem, 25 rows a call), status ``processed``;
* notification-sender: status ``notifying``, SNS Publish, status ``completed``.

Step Functions is replaced by calling the three handlers in sequence per file; C files are
in flight at once, one thread each, every thread holding its own clients (a warm Lambda
container of each function). The bucket, both tables (keys and ``timestamp-index`` as the
seed's) and the topic get names unique to the run and are deleted afterwards.

Measured: files/s from the first file's start to the last file's SNS notification; latency
percentiles of start → notification; the requests a file made by ``service/operation``
(counted at each HTTP request botocore creates, so retries count, as in txpipe's
``txpipe_storage_calls_total``). Prints a summary, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import datetime
from decimal import Decimal
from typing import Any

import boto3
from botocore.config import Config

EXPECTED_COLUMNS = ["transaction_id", "amount", "currency", "timestamp", "merchant", "status"]
ENVIRONMENT = "bench"


def new_session() -> boto3.session.Session:
    """A session with moto's dummy credentials and region (one per thread: sessions are not
    thread-safe)."""
    return boto3.session.Session(
        aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )


def csv_file(run: str, n: int, rows: int) -> str:
    """The same file `txpipe bench e2e` uploads (cli/src/bench_e2e.rs, csv_file)."""
    out = ["transaction_id,amount,currency,timestamp,merchant,status\n"]
    for i in range(rows):
        out.append(
            f"{run}-{n}-{i},{(n * 31 + i) % 10_000}.{i % 100:02},EUR,"
            f"2024-05-{i % 28 + 1:02}T12:{i % 60:02}:00Z,Merchant {i % 97},completed\n"
        )
    return "".join(out)


class Calls:
    """Requests by ``service/operation``, counted as botocore creates each HTTP request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.enabled = False

    def hook(self, event_name: str, **_: Any) -> None:
        # event_name: request-created.<service>.<Operation>
        _, service, operation = event_name.split(".", 2)
        if self.enabled:
            with self.lock:
                self.counts[f"{service}/{operation}"] += 1

    def attach(self, client: Any) -> None:
        client.meta.events.register("request-created", self.hook)


class Resources:
    """The run's bucket, tables and topic (the seed's shapes), created and removed."""

    def __init__(self, session: boto3.session.Session, endpoint: str, suffix: str) -> None:
        self.s3 = session.client("s3", endpoint_url=endpoint)
        self.ddb = session.client("dynamodb", endpoint_url=endpoint)
        self.sns = session.client("sns", endpoint_url=endpoint)
        self.bucket = f"transaction-csv-files-{suffix}"
        self.transactions_table = f"transactions-{suffix}"
        self.status_table = f"processing-status-{suffix}"
        self.topic_name = f"transaction-notifications-{suffix}"
        self.topic_arn = ""

    def create(self) -> None:
        self.s3.create_bucket(Bucket=self.bucket)
        for table, key in ((self.transactions_table, "transaction_id"), (self.status_table, "file_id")):
            self.ddb.create_table(
                TableName=table,
                BillingMode="PAY_PER_REQUEST",
                KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
                AttributeDefinitions=[
                    {"AttributeName": key, "AttributeType": "S"},
                    {"AttributeName": "timestamp", "AttributeType": "N"},
                ],
                GlobalSecondaryIndexes=[
                    {
                        "IndexName": "timestamp-index",
                        "KeySchema": [{"AttributeName": "timestamp", "KeyType": "HASH"}],
                        "Projection": {"ProjectionType": "ALL"},
                    }
                ],
            )
            self.ddb.get_waiter("table_exists").wait(TableName=table)
        self.topic_arn = self.sns.create_topic(Name=self.topic_name)["TopicArn"]

    def delete(self) -> None:
        """Removes whatever was made; reports, but does not stop at, what fails."""
        steps = [
            ("bucket", self._delete_bucket),
            ("transactions table", lambda: self.ddb.delete_table(TableName=self.transactions_table)),
            ("status table", lambda: self.ddb.delete_table(TableName=self.status_table)),
            ("topic", lambda: self.topic_arn and self.sns.delete_topic(TopicArn=self.topic_arn)),
        ]
        for what, step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                print(f"seed bench: deleting the {what}: {e}", file=sys.stderr)

    def _delete_bucket(self) -> None:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        self.s3.delete_bucket(Bucket=self.bucket)


class SeedLambdas:
    """One warm container of each of the seed's three functions (their module-level clients),
    with the handlers' AWS calls as in the seed's app.py files."""

    def __init__(self, endpoint: str, res: Resources, calls: Calls) -> None:
        session = new_session()
        config = Config(retries={"mode": "legacy"})  # what the Lambda runtime's boto3 uses

        def client(service: str) -> Any:
            c = session.client(service, endpoint_url=endpoint, config=config)
            calls.attach(c)
            return c

        def dynamodb() -> Any:
            r = session.resource("dynamodb", endpoint_url=endpoint, config=config)
            calls.attach(r.meta.client)
            return r

        # csv_validator/app.py: s3_client, dynamodb
        self.v_s3, self.v_ddb = client("s3"), dynamodb()
        # data_transformer/app.py: s3_client, dynamodb
        self.t_s3, self.t_ddb = client("s3"), dynamodb()
        # notification_sender/app.py: sns_client, dynamodb
        self.n_sns, self.n_ddb = client("sns"), dynamodb()
        self.res = res
        self.notified_at = 0.0

    @staticmethod
    def _update_status(ddb: Any, table_name: str, file_id: str, status: str, message: str = "") -> None:
        # update_status_table(), the same in all three functions
        table = ddb.Table(table_name)
        timestamp = int(datetime.utcnow().timestamp())
        table.put_item(
            Item={
                "file_id": file_id,
                "status": status,
                "timestamp": timestamp,
                "message": message,
                "updated_at": datetime.utcnow().isoformat(),
            }
        )

    @staticmethod
    def _validate_csv_schema(csv_content: str) -> tuple[bool, str, list[dict[str, Any]]]:
        # csv_validator/app.py: validate_csv_schema()
        try:
            reader = csv.DictReader(io.StringIO(csv_content))
            if not reader.fieldnames:
                return False, "CSV file is empty or has no headers", []
            missing = set(EXPECTED_COLUMNS) - set(reader.fieldnames)
            if missing:
                return False, f"Missing required columns: {', '.join(missing)}", []
            parsed_rows = []
            for idx, row in enumerate(reader, start=1):
                empty = [col for col in EXPECTED_COLUMNS if not row.get(col)]
                if empty:
                    return False, f"Row {idx} has empty fields: {', '.join(empty)}", []
                try:
                    float(row["amount"])
                except ValueError:
                    return False, f"Row {idx}: Invalid amount value '{row['amount']}'", []
                if row["status"] not in ["completed", "pending", "failed"]:
                    return False, f"Row {idx}: Invalid status '{row['status']}'", []
                parsed_rows.append(row)
            if not parsed_rows:
                return False, "CSV file contains no data rows", []
            return True, "", parsed_rows
        except Exception as e:  # noqa: BLE001 - as the seed
            return False, f"CSV parsing error: {e}", []

    def validator(self, event: dict[str, Any]) -> dict[str, Any]:
        """csv_validator handler, direct-invocation branch with the CSV in the event."""
        file_id = event["file_id"]
        csv_content = event["csv_content"]
        self._update_status(self.v_ddb, self.res.status_table, file_id, "validating")
        is_valid, error_message, parsed_rows = self._validate_csv_schema(csv_content)
        if not is_valid:
            self._update_status(self.v_ddb, self.res.status_table, file_id, "validation_failed", error_message)
            raise RuntimeError(f"{file_id}: validation failed: {error_message}")
        s3_key = f"validated/{file_id}.csv"
        self.v_s3.put_object(Bucket=self.res.bucket, Key=s3_key, Body=csv_content, ContentType="text/csv")
        self._update_status(
            self.v_ddb, self.res.status_table, file_id, "validated", f"Successfully validated {len(parsed_rows)} rows"
        )
        return {
            "file_id": file_id,
            "s3_key": s3_key,
            "bucket": self.res.bucket,
            "row_count": len(parsed_rows),
            "status": "validated",
        }

    def transformer(self, event: dict[str, Any]) -> dict[str, Any]:
        """data_transformer handler, Step Functions branch."""
        file_id = event.get("file_id", "unknown")
        s3_key = event.get("s3_key")
        bucket = event.get("bucket", self.res.bucket)
        self._update_status(self.t_ddb, self.res.status_table, file_id, "processing")
        response = self.t_s3.get_object(Bucket=bucket, Key=s3_key)
        csv_content = response["Body"].read().decode("utf-8")
        # transform_and_store_data()
        transactions_table = self.t_ddb.Table(self.res.transactions_table)
        records_processed = 0
        with transactions_table.batch_writer() as batch:
            for row in csv.DictReader(io.StringIO(csv_content)):
                item = {
                    "transaction_id": row["transaction_id"],
                    "amount": Decimal(str(row["amount"])),
                    "currency": row["currency"],
                    "timestamp": int(datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00")).timestamp()),
                    "merchant": row["merchant"],
                    "status": row["status"],
                    "file_id": file_id,
                    "processed_at": datetime.utcnow().isoformat(),
                }
                batch.put_item(Item=item)
                records_processed += 1
        self._update_status(
            self.t_ddb,
            self.res.status_table,
            file_id,
            "processed",
            f"Successfully processed {records_processed} records",
        )
        return {"statusCode": 200, "file_id": file_id, "records_processed": records_processed, "status": "processed"}

    def notifier(self, event: dict[str, Any]) -> dict[str, Any]:
        """notification_sender handler."""
        file_id = event.get("file_id", "unknown")
        records_processed = event.get("records_processed", 0)
        status = event.get("status", "completed")
        self._update_status(self.n_ddb, self.res.status_table, file_id, "notifying")
        message = {
            "file_id": file_id,
            "records_processed": records_processed,
            "status": status,
            "timestamp": datetime.utcnow().isoformat(),
            "environment": ENVIRONMENT,
        }
        self.n_sns.publish(
            TopicArn=self.res.topic_arn,
            Subject=f"Transaction Processing Complete - {file_id}",
            Message=json.dumps(message, indent=2),
        )
        self.notified_at = time.perf_counter()
        self._update_status(
            self.n_ddb,
            self.res.status_table,
            file_id,
            "completed",
            f"Notification sent for {records_processed} records",
        )
        return {"statusCode": 200, "file_id": file_id, "notification_sent": True, "status": "completed"}

    def execution(self, file_id: str, csv_content: str) -> float:
        """One Step Functions execution: the three tasks in sequence. Returns the time of the
        file's notification."""
        out = self.validator({"file_id": file_id, "csv_content": csv_content})
        out = self.transformer(out)
        self.notifier(out)
        return self.notified_at


def percentiles(samples: list[float]) -> dict[str, float] | None:
    """Nearest-rank percentiles in milliseconds, as txpipe bench e2e reports them."""
    if not samples:
        return None
    s = sorted(samples)

    def at(p: float) -> float:
        rank = min(max(math.ceil(p * len(s)), 1), len(s))
        return s[rank - 1] * 1e3

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)}


def run(endpoint: str, files: int, rows: int, concurrency: int, warmup: int) -> dict[str, Any]:
    """Creates the resources, runs warm-up and timed files, removes the resources."""
    suffix = f"seedbench-{uuid.uuid4().hex[:12]}"
    run_id = uuid.uuid4().hex[:12]
    res = Resources(new_session(), endpoint, suffix)
    calls = Calls()
    res.create()
    try:
        lock = threading.Lock()
        next_file = [0]
        latencies: list[float] = []
        errors: list[str] = []
        last = [0.0]
        # the threads live through both passes (their clients and connections stay warm); the
        # main thread meets them when their clients are made, after the warm-up, at the start
        barrier = threading.Barrier(concurrency + 1)

        def files_until(lambdas: SeedLambdas, end: int, timed: bool) -> None:
            while True:
                with lock:
                    n = next_file[0]
                    if n >= end:
                        return
                    next_file[0] += 1
                body = csv_file(run_id, n, rows)
                started = time.perf_counter()
                try:
                    notified = lambdas.execution(f"{run_id}-{n}", body)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"file {n}: {e}")
                    continue
                if timed:
                    with lock:
                        latencies.append(notified - started)
                        last[0] = max(last[0], notified)

        def worker() -> None:
            try:
                lambdas: SeedLambdas | None = SeedLambdas(endpoint, res, calls)
            except Exception as e:  # noqa: BLE001 - reported; the thread still meets the others
                lambdas = None
                with lock:
                    errors.append(f"making clients: {e}")
            barrier.wait()
            if lambdas:
                files_until(lambdas, warmup, timed=False)
            barrier.wait()
            barrier.wait()
            if lambdas:
                files_until(lambdas, warmup + files, timed=True)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        barrier.wait()  # clients made
        barrier.wait()  # warm-up done
        calls.enabled = True
        started = time.perf_counter()
        barrier.wait()  # go
        for t in threads:
            t.join()
        calls.enabled = False
        completed = len(latencies)
        seconds = max(last[0] - started, 1e-9)
    finally:
        res.delete()
    return {
        "target": f"the seed's handlers (stand-in, {concurrency} threads) on {endpoint}",
        "files": files,
        "rows_per_file": rows,
        "concurrency": concurrency,
        "warmup": warmup,
        "completed": completed,
        "failed": files - completed,
        "errors": errors[:10],
        "seconds": seconds,
        "files_per_second": completed / seconds,
        "rows_per_second": completed * rows / seconds,
        "completed_ms": percentiles(latencies),
        "calls_per_file": {op: n / max(completed, 1) for op, n in sorted(calls.counts.items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="S3/DynamoDB/SNS endpoint URL (moto)")
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8, help="files in flight (threads)")
    parser.add_argument("--warmup", type=int, default=0, help="files run before the timed ones")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args.endpoint, args.files, args.rows, max(args.concurrency, 1), args.warmup)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        p = report["completed_ms"] or {}
        print(f"{report['target']}: {report['files']} files of {report['rows_per_file']} rows")
        print(f"  completed {report['completed']}, failed {report['failed']}")
        print(f"  throughput: {report['files_per_second']:.1f} files/s ({report['seconds']:.2f} s)")
        if p:
            print(f"  start → notification: p50 {p['p50']:.1f} ms  p90 {p['p90']:.1f} ms  max {p['max']:.1f} ms")
        total = sum(report["calls_per_file"].values())
        each = ", ".join(f"{op} {n:.2f}" for op, n in report["calls_per_file"].items())
        print(f"  calls a file: {total:.2f} ({each})")
    for e in report["errors"]:
        print(f"seed bench: {e}", file=sys.stderr)
    # a file that raised is a run that failed (unreachable endpoint...), not a figure
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
