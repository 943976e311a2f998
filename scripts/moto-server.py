"""Runs moto_server (the tests' S3/DynamoDB stand-in) with two fixes to its TransactWriteItems
(moto 5.2.5, DynamoDBBackend.transact_write_items), so it behaves as DynamoDB does:

- Atomicity under concurrency. moto rolls a cancelled transaction back by putting back whole
  copies of the tables it touched, taken when it started, while other requests run in other
  threads: every write another request made to those tables meanwhile is lost. (A conditional
  write that fails is an everyday event for txpipe's ledger, so the tests lost rows.) Here
  transactions and the single-item and batch writes run one at a time, so a rollback only
  ever undoes its own transaction.
- Cost. moto backs up a transaction's tables by deep-copying them whole, once per action: a
  100-action transaction copied each table 100 times, so its cost grew with the size of the
  tables times the actions (250 ms a transaction at 20,000 items). DynamoDB's cost does not
  grow with the table. Here nothing is copied: each item a transaction is about to write is
  noted as it was (an undo log), and a cancelled transaction puts those items back, newest
  first. The outcome is the same as restoring the copies (writes run one at a time, above, so
  only the transaction's own writes are undone); the cost is the items it writes.

Nothing else is changed.

Usage: python moto-server.py [moto_server arguments]
"""

import copy
import sys
import threading

import moto.dynamodb.models as models
from moto.server import main

_local = threading.local()


class _NoTableCopies:
    """Stands in for the `copy` module inside moto's DynamoDB backend: during a transaction a
    table is not copied for the rollback (moto then "restores" the table it already has, a
    no-op); the undo log below restores the items instead."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(obj, memo=None):
        if getattr(_local, "undo", None) is not None and isinstance(obj, models.Table):
            return obj
        return copy.deepcopy(obj, memo)


# one writer at a time (re-entrant: a transaction calls put_item and delete_item itself)
_writes = threading.RLock()


def _one_at_a_time(method):
    def locked(self, *args, **kwargs):
        with _writes:
            return method(self, *args, **kwargs)

    return locked


_put_item = models.DynamoDBBackend.put_item
_delete_item = models.DynamoDBBackend.delete_item
_update_item = models.DynamoDBBackend.update_item


def _key_of_item(backend, table_name, attrs):
    table = backend.get_table(table_name)
    key = {table.hash_key_attr: attrs[table.hash_key_attr]}
    if table.range_key_attr is not None:
        key[table.range_key_attr] = attrs[table.range_key_attr]
    return key


def _noting(method, key_of):
    """`method`, which first notes the item it is about to write as it is now, while a
    transaction on this thread keeps an undo log."""

    def noted(self, table_name, *args, **kwargs):
        undo = getattr(_local, "undo", None)
        if undo is not None:
            key = key_of(self, table_name, *args, **kwargs)
            before = self.get_item(table_name, key)
            undo.append((table_name, key, copy.deepcopy(before.to_json()["Attributes"]) if before else None))
        return method(self, table_name, *args, **kwargs)

    return noted


def _put_key(backend, table_name, item_attrs, *args, **kwargs):
    return _key_of_item(backend, table_name, item_attrs)


def _key_arg(backend, table_name, key=None, *args, **kwargs):
    return key


_transact = models.DynamoDBBackend.transact_write_items


def _transact_write_items(self, transact_items):
    _local.undo = []
    try:
        return _transact(self, transact_items)
    except BaseException:
        undo, _local.undo = _local.undo, None
        for table_name, key, before in reversed(undo):
            if before is None:
                _delete_item(self, table_name, key)
            else:
                _put_item(self, table_name, before)
        raise
    finally:
        _local.undo = None


models.copy = _NoTableCopies()
models.DynamoDBBackend.put_item = _noting(_put_item, _put_key)
models.DynamoDBBackend.delete_item = _noting(_delete_item, _key_arg)
models.DynamoDBBackend.update_item = _noting(_update_item, _key_arg)
models.DynamoDBBackend.transact_write_items = _one_at_a_time(_transact_write_items)
for _name in ("put_item", "delete_item", "update_item", "batch_write_item"):
    if hasattr(models.DynamoDBBackend, _name):
        setattr(models.DynamoDBBackend, _name, _one_at_a_time(getattr(models.DynamoDBBackend, _name)))

if __name__ == "__main__":
    sys.exit(main())
