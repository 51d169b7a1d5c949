-- An event parked because its customer is linked to no tenant yet must never stay parked
-- once a link commits. The subtransaction the event is applied in takes the customer's lock
-- (billing_route_v1), and its rollback on TB002 released it: a link could then take the
-- lock, apply the customer's parked events without seeing this one (not yet committed), and
-- commit; this one then committed parked, and stayed so until a replay.
--
-- Now a parked event takes the customer's lock again, at the top of its transaction, so it
-- is held to the commit: a link made later waits for the commit and its unparking then sees
-- the event; a link committed in between is seen here, and the event is applied at once
-- (a second try; it cannot park again while the lock is held). Unchanged otherwise.
CREATE OR REPLACE FUNCTION tollhouse.billing_try_apply_v1(
    p_type text, p_obj jsonb, p_at timestamptz, p_customer text,
    OUT status text, OUT error text, OUT tenant_id uuid, OUT customer_id text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_state text;
BEGIN
    FOR v_try IN 1 .. 2 LOOP
        customer_id := p_customer;
        error := NULL;
        BEGIN
            SELECT a.status, a.tenant_id, coalesce(a.customer_id, p_customer)
            INTO status, tenant_id, customer_id
            FROM tollhouse.billing_apply_v1(p_type, p_obj, p_at) a;
        EXCEPTION
            WHEN SQLSTATE 'TB002' THEN
                GET STACKED DIAGNOSTICS customer_id = PG_EXCEPTION_DETAIL;
                status := 'parked';
            WHEN SQLSTATE 'TB001' THEN
                status := 'failed';
                error := SQLERRM;
            WHEN OTHERS THEN
                v_state := SQLSTATE;
                IF v_state IN ('40001', '40P01') THEN
                    RAISE;
                END IF;
                status := 'failed';
                -- A signed object we cannot read (an impossible timestamp, a number that is
                -- not one): kept as failed with the reason, never an error that loses it.
                error := CASE WHEN v_state LIKE '22%'
                              THEN format('unreadable %s: %s', p_type, SQLERRM)
                              ELSE SQLERRM END;
        END;
        EXIT WHEN status <> 'parked';
        -- Parked: the customer's lock again, to the commit; linked meanwhile: try again.
        EXIT WHEN tollhouse.billing_route_v1(customer_id) IS NULL;
    END LOOP;
END
$$;
