"""The outbox's migrations. The rule every revision here follows.

A migration runs during a deploy, while processes of the previous release are still
spilling into the outbox and replaying from it, and before or after the new release's
processes start. Nothing may make an old producer's INSERT fail, or make any producer
wait long. So a revision only **expands**:

- new columns are nullable or have a server default (old producers do not name them);
- nothing is renamed, retyped, made NOT NULL, or dropped that a supported release reads
  or writes; such tightening is a later, *contracting* revision that the README's
  "Deploying a new version" marks "run after every process is on version X";
- each step is idempotent and brief (``spillover/ddl.py``): Postgres DDL under
  ``lock_timeout`` with retries, indexes built ``CONCURRENTLY``; a backfill, if one is ever
  needed, in batches of their own transactions (none so far); no SQLite table rebuild
  (``batch_alter_table`` copies the table under the write lock);
- a revision that has shipped is never edited so that databases already past it end up
  different: a fix is a new revision. (0002 was rewritten once, before this rule: its
  first form made ``target`` NOT NULL; 0003 brings databases of either form to one schema.)

Producers of this release write the row shape the schema has (``Outbox`` reads the
table's columns), so they may also start before the migration runs.
"""
