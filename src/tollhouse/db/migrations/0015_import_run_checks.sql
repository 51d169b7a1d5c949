-- The import's bookkeeping rows (import_staging, import_issues) are tied to their run by
-- statement-level checks instead of foreign keys. Only the import writes these tables, and
-- it writes a whole run's rows in one statement: a million staged rows for a million-record
-- file. The foreign keys checked each row on its own, one query per row, which was about a
-- third of the staging statement's time (a serial step of the import; see docs/import.md).
-- The triggers below keep the foreign keys' guarantees, once per statement:
-- - every row written names an existing run, and that run is locked FOR KEY SHARE until the
--   writer commits, so a concurrent delete of the run waits (a foreign key's check does
--   exactly this); a run that is not visible to the check's statement is missing;
-- - deleting a run deletes its rows (was ON DELETE CASCADE). The cascade sees what its
--   statement's snapshot sees, so it runs under READ COMMITTED only: under REPEATABLE READ or
--   SERIALIZABLE it could miss rows committed since the transaction's snapshot (the foreign
--   key re-checked and failed with 40001 then), so such a delete is refused;
-- - a run keeps its id (the foreign key refused the change while rows named the run).
-- What differs: a plain TRUNCATE of import_runs now empties the two tables too (the foreign
-- key refused it unless they were truncated with it); the checks run as the writing role,
-- under its row-level security (the service role sees every run; a foreign key's check
-- ignored policies); an UPDATE of the rows is checked even when run_id is unchanged; a
-- data-only restore must load import_runs first or disable triggers.

ALTER TABLE tollhouse.import_staging DROP CONSTRAINT import_staging_run_id_fkey;
ALTER TABLE tollhouse.import_issues DROP CONSTRAINT import_issues_run_id_fkey;

-- The runs named by the rows a statement wrote must exist; they stay locked against deletion.
-- SQLSTATE 23503 (foreign_key_violation), as before.
CREATE FUNCTION tollhouse.import_run_check() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_runs uuid[];
    v_locked uuid[];
    v_missing uuid;
BEGIN
    -- One pass over the rows written: their distinct runs (one, in practice).
    SELECT array_agg(d.run_id) INTO v_runs FROM (SELECT DISTINCT w.run_id FROM written w) d;
    IF v_runs IS NULL THEN
        RETURN NULL;
    END IF;
    -- Lock and find in one statement: a run counts only if this statement locked it (in id
    -- order, so two writers lock in the same order).
    v_locked := ARRAY(SELECT r.id FROM tollhouse.import_runs r WHERE r.id = ANY (v_runs)
                      ORDER BY r.id FOR KEY SHARE);
    SELECT u.id INTO v_missing FROM unnest(v_runs) u(id) WHERE u.id <> ALL (v_locked) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "%" names no import run', TG_TABLE_NAME
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = TG_TABLE_NAME || '_run_check',
                  DETAIL = format('Key (run_id)=(%s) is not present in table "import_runs".',
                                  v_missing);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER import_staging_run_check AFTER INSERT ON tollhouse.import_staging
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.import_run_check();
CREATE TRIGGER import_staging_run_check_update AFTER UPDATE ON tollhouse.import_staging
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.import_run_check();
CREATE TRIGGER import_issues_run_check AFTER INSERT ON tollhouse.import_issues
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.import_run_check();
CREATE TRIGGER import_issues_run_check_update AFTER UPDATE ON tollhouse.import_issues
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.import_run_check();

-- A deleted run takes its staged rows and its report with it (under READ COMMITTED: see above).
CREATE FUNCTION tollhouse.import_runs_deleted() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'import runs are deleted under READ COMMITTED only'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Under ' || upper(current_setting('transaction_isolation'))
                           || ' the delete could miss rows of the run committed since the'
                           || ' transaction''s snapshot.';
    END IF;
    DELETE FROM tollhouse.import_staging s USING gone g WHERE s.run_id = g.id;
    DELETE FROM tollhouse.import_issues i USING gone g WHERE i.run_id = g.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER import_runs_deleted AFTER DELETE ON tollhouse.import_runs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.import_runs_deleted();

-- TRUNCATE of the runs takes every run's rows with them (see above).
CREATE FUNCTION tollhouse.import_runs_truncated() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    TRUNCATE tollhouse.import_staging, tollhouse.import_issues;
    RETURN NULL;
END
$$;

CREATE TRIGGER import_runs_truncated AFTER TRUNCATE ON tollhouse.import_runs
    FOR EACH STATEMENT EXECUTE FUNCTION tollhouse.import_runs_truncated();

-- A run keeps its id: the rows naming it would be left behind.
CREATE FUNCTION tollhouse.import_runs_id_kept() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'an import run keeps its id'
        USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'import_runs_id_kept';
END
$$;

CREATE TRIGGER import_runs_id_kept BEFORE UPDATE OF id ON tollhouse.import_runs
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION tollhouse.import_runs_id_kept();

DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'tollhouse.import_run_check()',
        'tollhouse.import_runs_deleted()',
        'tollhouse.import_runs_truncated()',
        'tollhouse.import_runs_id_kept()'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tollhouse_service', f);
    END LOOP;
END
$$;
