"""What storing a file's rows costs moto, by the layout of the writes, for `scripts/bench-moto-rows`.

`scripts/bench-moto` compares whole pipelines; this isolates the rows, where txpipe and the
seed differ most (issue 11, goal 5). Each layout writes 100-row "files" of new transaction ids
(the attributes txpipe's DynamoDB adapter writes, `to_item` in common/src/storage/aws.rs;
the seed's own 8 for the seed), and moto's CPU (utime + stime of its process, from /proc) is
read around each layout's files:

* ``seed``: the seed's transformer, ``batch_writer()``: 4 BatchWriteItem of 25 unconditional
  puts into the transactions table;
* ``txpipe``: what ``DynamoStore::write`` sends: 2 TransactWriteItems of 50 rows, each row a
  put into the versions table and a put into the transactions table on the condition that
  the id is not stored yet;
* ``one-conditional-item``: the fewest items any conditional layout can write: 1
  TransactWriteItems of 100 conditional puts into the transactions table, nothing else (a
  lower bound, not a design: without the versions item a file's rows could not be listed
  consistently);
* ``versions-apart``: a design not built, for the issue's author to weigh: the versions items
  as 4 unconditional BatchWriteItem of 25 first, then 1 TransactWriteItems of the 100
  conditional puts into the transactions table. The version and the current row would no
  longer be written atomically (a refused row's version must then be deleted).
* ``versions-in-chunks``: the other design not built: 2 TransactWriteItems, each of a chunk's
  50 conditional puts into the transactions table and one item holding those 50 rows'
  versions together (keyed by the file and the chunk's first id, the rows as one string
  attribute). Atomic and consistently listable like txpipe's layout, in 102 items instead of
  200 (on DynamoDB ~220 write units a file instead of 400).

Layouts take turns, round after round, so moto's own drift (its tables grow) falls on all of
them alike. The two tables get names unique to the run and are deleted afterwards. Prints
moto's CPU per 100 rows for each layout, each round and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid
from typing import Any, Callable

import boto3


def moto_ticks(pid: int) -> int:
    """utime + stime of the moto process, in clock ticks (the fields after the command name)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def txpipe_item(file_id: str, i: int) -> dict[str, Any]:
    """A first version as txpipe's adapter writes it (`to_item`)."""
    return {
        "transaction_id": {"S": f"{file_id}-{i:04}"},
        "file_id": {"S": file_id},
        "amount": {"S": "10.50"},
        "currency": {"S": "USD"},
        "timestamp": {"S": "2024-01-01T00:00:00+00:00"},
        "timestamp_epoch": {"N": "1704067200"},
        "merchant": {"S": "Shop"},
        "status": {"S": "completed"},
        "processed_at": {"S": "2026-11-25T10:00:00+00:00"},
        "version": {"N": "1"},
    }


def seed_item(file_id: str, i: int) -> dict[str, Any]:
    """A row as the seed's transformer writes it."""
    return {
        "transaction_id": {"S": f"{file_id}-{i:04}"},
        "amount": {"N": "10.50"},
        "currency": {"S": "USD"},
        "timestamp": {"N": "1704067200"},
        "merchant": {"S": "Shop"},
        "status": {"S": "completed"},
        "file_id": {"S": file_id},
        "processed_at": {"S": "2026-11-25T10:00:00"},
    }


NEW = "attribute_not_exists(transaction_id)"


def positive(text: str) -> int:
    """An argument that must be a whole number above 0."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--moto-pid", type=int, required=True)
    parser.add_argument("--files", type=positive, default=100, help="100-row files a layout writes a round")
    parser.add_argument("--rounds", type=positive, default=3)
    args = parser.parse_args()

    ddb = boto3.client(
        "dynamodb",
        endpoint_url=args.endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    run = uuid.uuid4().hex[:8]
    tx, versions = f"rows-bench-{run}-transactions", f"rows-bench-{run}-transaction-versions"
    ddb.create_table(
        TableName=tx,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "transaction_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "transaction_id", "KeyType": "HASH"}],
    )
    ddb.create_table(
        TableName=versions,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "file_id", "AttributeType": "S"},
            {"AttributeName": "transaction_id", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "file_id", "KeyType": "HASH"},
            {"AttributeName": "transaction_id", "KeyType": "RANGE"},
        ],
    )

    def seed(file_id: str) -> None:
        items = [seed_item(file_id, i) for i in range(100)]
        for c in range(0, 100, 25):
            ddb.batch_write_item(RequestItems={tx: [{"PutRequest": {"Item": it}} for it in items[c : c + 25]]})

    def txpipe(file_id: str) -> None:
        items = [txpipe_item(file_id, i) for i in range(100)]
        for c in range(0, 100, 50):
            actions = []
            for it in items[c : c + 50]:
                actions.append({"Put": {"TableName": versions, "Item": it}})
                actions.append({"Put": {"TableName": tx, "Item": it, "ConditionExpression": NEW}})
            ddb.transact_write_items(TransactItems=actions)

    def one_conditional_item(file_id: str) -> None:
        items = [txpipe_item(file_id, i) for i in range(100)]
        ddb.transact_write_items(
            TransactItems=[{"Put": {"TableName": tx, "Item": it, "ConditionExpression": NEW}} for it in items]
        )

    def versions_apart(file_id: str) -> None:
        items = [txpipe_item(file_id, i) for i in range(100)]
        for c in range(0, 100, 25):
            ddb.batch_write_item(RequestItems={versions: [{"PutRequest": {"Item": it}} for it in items[c : c + 25]]})
        ddb.transact_write_items(
            TransactItems=[{"Put": {"TableName": tx, "Item": it, "ConditionExpression": NEW}} for it in items]
        )

    def versions_in_chunks(file_id: str) -> None:
        items = [txpipe_item(file_id, i) for i in range(100)]
        for c in range(0, 100, 50):
            chunk = items[c : c + 50]
            rows = "\n".join(
                ",".join(v.get("S", v.get("N", "")) for k, v in it.items() if k not in ("file_id", "version"))
                for it in chunk
            )
            versions_item = {
                "file_id": {"S": file_id},
                "transaction_id": chunk[0]["transaction_id"],
                "rows": {"S": rows},
                "count": {"N": str(len(chunk))},
            }
            actions = [{"Put": {"TableName": versions, "Item": versions_item}}]
            actions += [{"Put": {"TableName": tx, "Item": it, "ConditionExpression": NEW}} for it in chunk]
            ddb.transact_write_items(TransactItems=actions)

    layouts: dict[str, Callable[[str], None]] = {
        "seed (4 BatchWriteItem x 25)": seed,
        "txpipe (2 TransactWriteItems x 50 rows, 2 items a row)": txpipe,
        "one-conditional-item (1 TransactWriteItems x 100)": one_conditional_item,
        "versions-apart (4 BatchWriteItem x 25 versions, then 1 TransactWriteItems x 100)": versions_apart,
        "versions-in-chunks (2 TransactWriteItems x (50 conditional rows + 1 versions item))": versions_in_chunks,
    }
    ms: dict[str, list[float]] = {name: [] for name in layouts}
    try:
        tick = 1000 / os.sysconf("SC_CLK_TCK")  # ms a clock tick
        for r in range(args.rounds):
            for name, write in layouts.items():
                before = moto_ticks(args.moto_pid)
                for _ in range(args.files):
                    write(uuid.uuid4().hex)
                ms[name].append((moto_ticks(args.moto_pid) - before) * tick / args.files)
                print(f"round {r + 1}: {name}: {ms[name][-1]:.1f} ms", file=sys.stderr)
    finally:
        for table in (tx, versions):
            ddb.delete_table(TableName=table)

    print(f"moto's CPU per 100 new rows ({args.files} files a layout a round, {args.rounds} rounds):")
    for name, values in ms.items():
        each = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {name}: median {statistics.median(values):.1f} ms ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
