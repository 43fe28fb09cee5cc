-- Runs once, when the postgres image initialises an empty data directory: mount this folder
-- at /docker-entrypoint-initdb.d. It runs as POSTGRES_USER in POSTGRES_DB, which the image
-- has already created, so there is no CREATE DATABASE here. The roles the fleet logs in as
-- are created by 002-least-privilege.sql.
--
-- The livingai_tasks tables are NOT created here. `livingai-tasks migrate` (or
-- store.migrate()) creates and upgrades them, and records the applied version in
-- lai_schema_version, so a database initialised long ago is upgraded the same way.

-- Timestamps are stored as timestamptz and read back as UTC whatever this says; UTC only
-- makes created_at/updated_at in psql read like the workers' logs.
-- Store transactions last milliseconds. A session idle inside a transaction for a minute is a
-- stuck client holding row locks that would make claim() and append() wait; end it.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET timezone TO %L', current_database(), 'UTC');
    EXECUTE format('ALTER DATABASE %I SET idle_in_transaction_session_timeout TO %L',
                   current_database(), '60s');
END
$$;
