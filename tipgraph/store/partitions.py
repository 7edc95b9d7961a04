"""Postgres keeps ``decisions`` in one partition per week of ``created_at`` (migration 0010).

Retention then drops a whole week's partition instead of deleting its rows one by one, and
a query bounded in time reads only the weeks it covers.  A week is Monday 00:00 UTC up to
the next Monday; its partition is ``decisions_pYYYYMMDD``, named after that Monday.

Partitions are made ahead of time (:data:`WEEKS_AHEAD`) when a store opens and on every
retention run.  A row outside every week lands in ``decisions_default``; when its week's
partition is made later, the rows of that week move out of the default partition into it
(Postgres refuses to attach a partition whose rows the default partition still holds).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from psycopg import sql

from tipgraph.store._sql import Cursor

logger = logging.getLogger(__name__)

TABLE = "decisions"
DEFAULT_PARTITION = f"{TABLE}_default"
WEEKS_AHEAD = 4
"""Weeks past the current one that always have a partition: a store that opens or runs
retention at least once a month never writes into the default partition."""
_NAME = re.compile(rf"^{TABLE}_p(\d{{8}})$")


@dataclass(frozen=True, slots=True)
class WeekPartition:
    name: str
    start: datetime
    end: datetime


def week_start(moment: datetime) -> datetime:
    """Monday 00:00 UTC of ``moment``'s week."""
    day = moment.astimezone(UTC).date()
    return datetime.combine(day - timedelta(days=day.weekday()), time(), UTC)


def week_partition(moment: datetime) -> WeekPartition:
    """The week of ``moment``."""
    monday = week_start(moment)
    return WeekPartition(f"{TABLE}_p{monday:%Y%m%d}", monday, monday + timedelta(weeks=1))


def weeks_between(first: datetime, last: datetime) -> list[WeekPartition]:
    """Every week from ``first``'s to ``last``'s, both included."""
    weeks, start = [], week_start(first)
    while start <= last:
        weeks.append(week_partition(start))
        start += timedelta(weeks=1)
    return weeks


def existing_weeks(cur: Cursor) -> list[WeekPartition]:
    """The week partitions ``decisions`` has, oldest first."""
    cur.execute(
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass",
        (TABLE,),
    )
    weeks = []
    for (name,) in cur.fetchall():
        match = _NAME.match(name)
        if match is not None:
            monday = datetime.strptime(match[1], "%Y%m%d").replace(tzinfo=UTC)
            weeks.append(week_partition(monday))
    return sorted(weeks, key=lambda week: week.start)


def ensure_weeks(cur: Cursor, first: datetime, last: datetime) -> list[str]:
    """Make the missing partitions of every week from ``first``'s to ``last``'s; returns
    the names made.  Rows of such a week already in the default partition move into it.
    Before migration 0010 decisions is one table, and nothing is made."""
    cur.execute("SELECT 1 FROM pg_partitioned_table WHERE partrelid = %s::regclass", (TABLE,))
    if cur.fetchone() is None:
        return []
    have = {week.name for week in existing_weeks(cur)}
    made = []
    for week in weeks_between(first, last):
        if week.name not in have:
            _make_week(cur, week)
            made.append(week.name)
    if made:
        logger.info("made decision log partitions %s", ", ".join(made))
    return made


def _make_week(cur: Cursor, week: WeekPartition) -> None:
    name, default = sql.Identifier(week.name), sql.Identifier(DEFAULT_PARTITION)
    bounds = (week.start, week.end)
    literals = (sql.Literal(week.start), sql.Literal(week.end))  # DDL takes no parameters
    cur.execute(
        sql.SQL("SELECT 1 FROM {} WHERE created_at >= %s AND created_at < %s LIMIT 1").format(
            default
        ),
        bounds,
    )
    if cur.fetchone() is None:
        cur.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                name, sql.Identifier(TABLE), *literals
            )
        )
        return
    # Attaching checks that the default partition holds no row of the week: move them first.
    cur.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            name, sql.Identifier(TABLE)
        )
    )
    cur.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM {} WHERE created_at >= %s AND created_at < %s "
            "RETURNING *) INSERT INTO {} SELECT * FROM moved"
        ).format(default, name),
        bounds,
    )
    logger.info("moved %d decisions from %s into %s", cur.rowcount, DEFAULT_PARTITION, week.name)
    cur.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(TABLE), name, *literals
        )
    )


def expired_weeks(cur: Cursor, before: datetime) -> list[WeekPartition]:
    """The week partitions whose every row is older than ``before``."""
    return [week for week in existing_weeks(cur) if week.end <= before]


def ensure_ahead(cur: Cursor, now: datetime) -> list[str]:
    """Partitions for ``now``'s week and the :data:`WEEKS_AHEAD` after it."""
    return ensure_weeks(cur, now, now + timedelta(weeks=WEEKS_AHEAD))
