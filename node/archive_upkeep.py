"""Upkeep of the node's archive between log entries: checkpoints and garbage collection.

* Every ``EVERY_S`` a checkpoint copies SQLite's WAL into the database file and syncs it, in a
  worker thread on a connection of its own (the event loop goes on writing meanwhile), so the
  WAL stays small and the history written so far is durable.
* Rows removed by the log stay in the archive, marked, until a snapshot covers the entry that
  removed them (a replay from an older snapshot must still read them, see
  consensus/archive.py). Once it does, they are deleted in batches of ``BATCH`` rows, with a
  checkpoint between batches, so no single step holds the event loop for long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from consensus.archive import ArchiveError
from node.archive_sqlite import SqliteArchive

log = logging.getLogger("colonies.archive")

EVERY_S = 5.0
BATCH = 500


async def keep_archive(
    archive: SqliteArchive, snapshot_index: Callable[[], int], every: float = EVERY_S
) -> None:
    """Runs until cancelled; ``snapshot_index()`` is the index of the last snapshot on disk."""
    while True:
        await trio.sleep(every)
        try:
            await trio.to_thread.run_sync(archive.checkpoint)
            while archive.collect(snapshot_index(), BATCH) == BATCH:
                await trio.sleep(0)
        except ArchiveError as e:
            # A failed checkpoint or clean-up loses nothing (the log still has it all): say
            # so and try again later; a failing write in an apply stops the node instead.
            log.error("archive upkeep failed (retrying in %gs): %s", every, e)
