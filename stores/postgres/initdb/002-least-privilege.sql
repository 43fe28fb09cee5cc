-- Least privilege: the database's superuser (POSTGRES_USER, the image's `postgres`) is for
-- `livingai-tasks migrate` alone. Workers, beat, Flower and the CLI log in as the fleet role,
-- which can read and write the livingai tables and nothing else: no CREATE, DROP, ALTER or
-- TRUNCATE, no other schema, no temporary tables. A stolen worker credential can then damage
-- records, but not the schema, the other schemas of the database, or the server.
--
-- Runs once, when the postgres image initialises an empty data directory, as POSTGRES_USER
-- in POSTGRES_DB (the image runs it with psql -v ON_ERROR_STOP=1). Needs psql >= 15 for
-- \getenv: passwords come from the container's environment, never from this file.
--
--   POSTGRES_FLEET_PASSWORD   the fleet role's password (required)
--   DEMO_LEDGER_PASSWORD      the example agent's ledger role (optional: no role without it)
--   LIVINGAI_FLEET_ROLE, LIVINGAI_SCHEMA, LIVINGAI_LEDGER_ROLE
--                             names, default livingai, livingai, livingai_demo_ledger (the
--                             store URL's ?schema= must name the same schema)
--
-- By hand on a database that already exists, as its owner or a superuser:
--   POSTGRES_FLEET_PASSWORD=... psql -v ON_ERROR_STOP=1 -d DB -f 002-least-privilege.sql

\getenv fleet_password POSTGRES_FLEET_PASSWORD
\getenv ledger_password DEMO_LEDGER_PASSWORD
\getenv fleet_role LIVINGAI_FLEET_ROLE
\getenv schema LIVINGAI_SCHEMA
\getenv ledger_role LIVINGAI_LEDGER_ROLE
\if :{?fleet_role}
\else
\set fleet_role livingai
\endif
\if :{?schema}
\else
\set schema livingai
\endif
\if :{?ledger_role}
\else
\set ledger_role livingai_demo_ledger
\endif
\if :{?fleet_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'POSTGRES_FLEET_PASSWORD is not set: the fleet role needs a password (openssl rand -hex 24)'; END $$;
\endif

-- The migrating role: tables it creates later get the default privileges below.
SELECT current_database() AS db, current_user AS migrator \gset

-- Nobody but the roles granted below may connect or make temporary tables, and nobody may
-- create objects in public (PostgreSQL < 15 let every role do so).
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- The store's schema, owned by the migrator: `migrate` finds it and creates the lai_ tables
-- in it (CREATE SCHEMA IF NOT EXISTS there is then a no-op).
CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION :"migrator";

CREATE ROLE :"fleet_role" LOGIN PASSWORD :'fleet_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
GRANT CONNECT ON DATABASE :"db" TO :"fleet_role";
GRANT USAGE ON SCHEMA :"schema" TO :"fleet_role";
-- Rows only: the store appends versions, updates latest rows and executions, deletes the
-- tiered store's resolved lai_tier_missed rows; the BIGSERIAL ids need their sequences.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA :"schema" TO :"fleet_role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA :"schema" TO :"fleet_role";
-- ... and the same on every table and sequence `migrate` creates later, this release's
-- and the next ones' (default privileges apply to objects the migrator creates).
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA :"schema"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"fleet_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA :"schema"
    GRANT USAGE, SELECT ON SEQUENCES TO :"fleet_role";

-- The example agent's "payment provider" (LIVINGAI_DEMO_LEDGER): an outside system in a real
-- deployment, so a role of its own, with its own schema, which it may shape (the ledger
-- creates its table on first use). Its default search_path ("$user", public) finds it.
-- Your own app has no ledger: leave DEMO_LEDGER_PASSWORD unset.
\if :{?ledger_password}
CREATE ROLE :"ledger_role" LOGIN PASSWORD :'ledger_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
GRANT CONNECT ON DATABASE :"db" TO :"ledger_role";
CREATE SCHEMA :"ledger_role" AUTHORIZATION :"ledger_role";
\endif
