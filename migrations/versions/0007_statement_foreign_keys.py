"""statement-level foreign keys for tokens and top_logprobs on PostgreSQL

A foreign-key constraint checks each inserted row on its own (a lookup and a lock of
the ``jobs`` row, ~8 µs a row): 60% of the time of ``COPY``-ing token rows. These
triggers keep the same guarantees once per statement instead, over the statement's
distinct job ids:

- inserting or updating rows whose ``job_id`` is not in ``jobs`` fails with
  ``foreign_key_violation``; the jobs named are locked ``FOR KEY SHARE`` until the
  transaction ends, as the constraint locks them, so a concurrent delete waits;
- deleting jobs deletes their token and top-k rows (``ON DELETE CASCADE``);
- truncating ``jobs`` truncates both tables;
- a job's ``id`` cannot change.

SQLite keeps its declared foreign keys (its bulk path is executemany, where the
constraint is cheap). ``api_client.schema.STATEMENT_CHECKED_TABLES`` names the tables.

Revision ID: 0007
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("tokens", "top_logprobs")  # api_client.schema.STATEMENT_CHECKED_TABLES

# Both go job by job, by key equality, as the constraint's own checks do: a plan that
# is an index scan whatever the planner knows of the tables. (A set-wise
# ``id = ANY($1)`` is planned, and cached, as a scan of all of ``jobs`` while that
# table has never been analyzed.)
CHECK_JOB_IDS = """
CREATE FUNCTION logprobe_check_job_ids() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    job text;
BEGIN
    FOR job IN SELECT DISTINCT job_id FROM new_rows LOOP
        -- Lock the job as a foreign key would: a concurrent delete waits for commit.
        PERFORM 1 FROM jobs WHERE id = job FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE foreign_key_violation USING
                MESSAGE = format('insert or update on table "%s" violates foreign key '
                                 '"fk_%s_job_id_jobs"', TG_TABLE_NAME, TG_TABLE_NAME),
                DETAIL = format('Key (job_id)=(%s) is not present in table "jobs".', job),
                TABLE = TG_TABLE_NAME;
        END IF;
    END LOOP;
    RETURN NULL;
END $$
"""

DELETE_JOB_ROWS = """
CREATE FUNCTION logprobe_delete_job_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    job text;
BEGIN
    FOR job IN SELECT id FROM old_rows LOOP
        DELETE FROM top_logprobs WHERE job_id = job;
        DELETE FROM tokens WHERE job_id = job;
    END LOOP;
    RETURN NULL;
END $$
"""

TRUNCATE_JOB_ROWS = """
CREATE FUNCTION logprobe_truncate_job_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE top_logprobs, tokens;
    RETURN NULL;
END $$
"""

KEEP_JOB_ID = """
CREATE FUNCTION logprobe_keep_job_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE foreign_key_violation USING
        MESSAGE = 'a job''s id cannot change: token and top-k rows refer to it',
        TABLE = 'jobs';
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for sql in (CHECK_JOB_IDS, DELETE_JOB_ROWS, TRUNCATE_JOB_ROWS, KEEP_JOB_ID):
        op.execute(sql)
    for table in TABLES:
        op.drop_constraint(f"fk_{table}_job_id_jobs", table, type_="foreignkey")
        for event in ("INSERT", "UPDATE"):
            op.execute(f"CREATE TRIGGER {table}_job_ids_on_{event.lower()} AFTER {event} "
                       f"ON {table} REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
                       "EXECUTE FUNCTION logprobe_check_job_ids()")
    op.execute("CREATE TRIGGER jobs_delete_rows AFTER DELETE ON jobs REFERENCING OLD TABLE "
               "AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION logprobe_delete_job_rows()")
    op.execute("CREATE TRIGGER jobs_truncate_rows AFTER TRUNCATE ON jobs FOR EACH STATEMENT "
               "EXECUTE FUNCTION logprobe_truncate_job_rows()")
    op.execute("CREATE TRIGGER jobs_keep_id BEFORE UPDATE OF id ON jobs FOR EACH ROW "
               "WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION logprobe_keep_job_id()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for trigger in ("jobs_keep_id", "jobs_truncate_rows", "jobs_delete_rows"):
        op.execute(f"DROP TRIGGER {trigger} ON jobs")
    for table in TABLES:
        for event in ("insert", "update"):
            op.execute(f"DROP TRIGGER {table}_job_ids_on_{event} ON {table}")
        # Rows of deleted jobs cannot exist (the triggers deleted them): no orphans.
        op.create_foreign_key(f"fk_{table}_job_id_jobs", table, "jobs", ["job_id"], ["id"],
                              ondelete="CASCADE")
    for function in ("logprobe_keep_job_id", "logprobe_truncate_job_rows",
                     "logprobe_delete_job_rows", "logprobe_check_job_ids"):
        op.execute(f"DROP FUNCTION {function}()")
