"""Runs moto_server (the tests' S3/DynamoDB stand-in) with two fixes to its TransactWriteItems
(moto 5.2.5, DynamoDBBackend.transact_write_items), so it behaves as DynamoDB does:

- Atomicity under concurrency. moto rolls a cancelled transaction back by putting back whole
  copies of the tables it touched, taken when it started, while other requests run in other
  threads: every write another request made to those tables meanwhile is lost. (A conditional
  write that fails is an everyday event for txpipe's ledger, so the tests lost rows.) Here
  transactions and the single-item and batch writes run one at a time, so a rollback only
  ever undoes its own transaction.
- Cost. moto backs up each table once per action, not once per table: a 100-action
  transaction deep-copies each table 100 times, so its cost grows with the size of the tables
  times the actions. Here it is one copy per table per transaction.

Nothing else is changed.

Usage: python moto-server.py [moto_server arguments]
"""

import copy
import sys
import threading

import moto.dynamodb.models as models
from moto.server import main

_local = threading.local()


class _CopyOncePerTable:
    """Stands in for the `copy` module inside moto's DynamoDB backend: while a transaction is
    being set up, a table deep-copied again gets the copy already made."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(obj, memo=None):
        backups = getattr(_local, "backups", None)
        if backups is None or not isinstance(obj, models.Table):
            return copy.deepcopy(obj, memo)
        if id(obj) not in backups:
            backups[id(obj)] = copy.deepcopy(obj, memo)
        return backups[id(obj)]


# one writer at a time (re-entrant: a transaction calls put_item and delete_item itself)
_writes = threading.RLock()


def _one_at_a_time(method):
    def locked(self, *args, **kwargs):
        with _writes:
            return method(self, *args, **kwargs)

    return locked


_transact = models.DynamoDBBackend.transact_write_items


def _transact_write_items(self, transact_items):
    _local.backups = {}
    try:
        return _transact(self, transact_items)
    finally:
        _local.backups = None


models.copy = _CopyOncePerTable()
models.DynamoDBBackend.transact_write_items = _one_at_a_time(_transact_write_items)
for _name in ("put_item", "delete_item", "update_item", "batch_write_item"):
    if hasattr(models.DynamoDBBackend, _name):
        setattr(models.DynamoDBBackend, _name, _one_at_a_time(getattr(models.DynamoDBBackend, _name)))

if __name__ == "__main__":
    sys.exit(main())
